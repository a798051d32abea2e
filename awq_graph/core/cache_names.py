"""The names a written KV-cache graph's cache inputs and outputs carry, and the metadata keys it
holds: the writers (``awq_graph.emit``) spell them, the runtime and onnxruntime-genai's config
read them, so they live here, below both."""
from __future__ import annotations

PAST = "past_key_values."  # cache inputs: past_key_values.{layer}.key / .value (and a generic cache's own parts)
PRESENT = "present."  # cache outputs: present.{layer}.key / .value, in the inputs' order

# onnxruntime-genai's patterns of the key/value names (genai_config.json), %d the layer
PAST_KEY, PAST_VALUE = PAST + "%d.key", PAST + "%d.value"
PRESENT_KEY, PRESENT_VALUE = PRESENT + "%d.key", PRESENT + "%d.value"

CONTEXT_KEY = "max_position_embeddings"  # model metadata: the positions the model was written for
KV_CACHE_KEY = "awq_graph.kv_cache"  # model metadata: "concat" for the generic decoder's growing cache


def past(slot: int, part: str) -> str:
    """The cache input of layer ``slot``'s ``part`` ("key", "value", ...)."""
    return f"{PAST}{slot}.{part}"


def present(slot: int, part: str) -> str:
    """The cache output of layer ``slot``'s ``part``."""
    return f"{PRESENT}{slot}.{part}"


def present_of(past_name: str) -> str:
    """The output that carries the cache input ``past_name`` on to the next step."""
    return PRESENT + past_name[len(PAST):]
