"""The model families the fused KV-cache decoder knows, and the shape it is built from.

This is the only place that names transformers model types (``FAMILIES``, one row each); the
block builders read a ``Family`` and a ``DecoderShape``, never the model type. Adding a family
is a row here and a test (tests/test_decoder.py: the float decoder against transformers).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """What the fused decoder must know of one transformers model type beyond its config."""

    block: str = "llama"  # the builder: "llama" (RMSNorm, rotary GQA, gated MLP or experts) or "gpt2"
    package: str | None = None  # transformers.models.<package> holds its class (default: the model type)
    moe: bool = False  # the MLP is a router over experts (QMoE)
    sandwich: bool = False  # norms after attention and around the MLP; local/global attention per layer
    sliding_window: bool = False  # config.sliding_window applies without use_sliding_window
    norm_offset: float = 0.0  # its norms multiply by (offset + w)
    multipliers: bool = False  # embedding, residual and attention multipliers, a logits divisor
    qkv_bias: bool = False  # attention_bias puts biases on q, k, v only (o_proj has none)


# qwen3 adds an RMSNorm over each head of q and k before the rotary; gemma scales the embedding
# by sqrt(hidden), writes its norms as x * (1 + w) and gates with GELU (tanh); gemma2 and gemma3
# add a norm after attention and around the MLP ("sandwich"), alternate local and global
# attention layers, and cap attention scores (gemma2: and logits) with c * tanh(x / c); gemma3
# also norms q and k per head and gives local layers their own rotary base; phi3 fuses q|k|v
# and gate|up into single linears; mixtral's MLP is a router and top-k of E gated experts (QMoE),
# qwen2_moe's, qwen3_moe's and olmoe's too (qwen2_moe adds a gated shared expert; qwen3_moe may
# keep a dense MLP in some layers; olmoe norms all of q and k, and may clamp q, k, v); granite is
# llama with multipliers. What a family's config says (head norms, softcaps, clip_qkv, windows
# per layer type) is read from the config and the parameters, not from this table.
FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(sliding_window=True),
    "qwen2": Family(qkv_bias=True),
    "qwen3": Family(),
    "gemma": Family(norm_offset=1.0),
    "gemma2": Family(norm_offset=1.0, sandwich=True, sliding_window=True),
    "gemma3_text": Family(package="gemma3", norm_offset=1.0, sandwich=True, sliding_window=True),
    "phi3": Family(sliding_window=True),
    "granite": Family(multipliers=True),
    "mixtral": Family(moe=True, sliding_window=True),
    "qwen2_moe": Family(moe=True),
    "qwen3_moe": Family(moe=True),
    "olmoe": Family(moe=True),
    "gpt2": Family(block="gpt2"),
}


def family_of(model) -> tuple[Family | None, str | None]:
    """(the family of ``model``, None) or (None, why it has none)."""
    model_type = getattr(model.config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        return None, f"model type '{model_type}' has no fused decoder (have: {', '.join(FAMILIES)})"
    package = family.package or model_type
    if not type(model).__module__.startswith(f"transformers.models.{package}."):
        return None, f"{type(model).__name__} is not transformers' own {model_type} class"
    return family, None


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    vocab: int
    eps: float
    scaling: float
    max_positions: int
    window: int  # GroupQueryAttention's local_window_size; -1: full attention
    activation: str = "silu"  # of the gate: silu, gelu_tanh, gelu
    norm_offset: float = 0.0  # gemma's norms multiply by (offset + w)
    embed_scale: float | None = None  # gemma multiplies the looked-up rows by sqrt(hidden)
    experts_per_token: int = 0  # MoE: top-k of the router (0: a dense MLP)
    renormalize: bool = True  # MoE: the picked experts' softmax weights are rescaled to sum to 1
    sandwich: bool = False  # gemma2/3: norms after attention and before and after the MLP
    attn_softcap: float = 0.0  # attention scores -> c * tanh(scores / c); 0: none
    final_softcap: float = 0.0  # logits -> c * tanh(logits / c); 0: none
    layer_types: tuple[str, ...] = ()  # per layer "sliding_attention" (uses ``window``) or "full_attention"
    clip_qkv: float = 0.0  # olmoe: q, k, v clamped to [-c, c]; 0: none
    residual_scale: float = 1.0  # granite: attention and MLP outputs are multiplied before the residual add
    logits_divisor: float = 1.0  # granite: logits = lm_head(h) / divisor

    def layer_window(self, i: int) -> int:
        return self.window if not self.layer_types or self.layer_types[i] == "sliding_attention" else -1

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim
