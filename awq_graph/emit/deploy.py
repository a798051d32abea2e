"""The files other runtimes read beside a KV-cache decoder, so that the folder runs as written:

    genai_config.json        onnxruntime-genai (``og.Model(OUT)``): the cache's shape and names, the
                             token ids, search defaults from the checkpoint's generation_config
    config.json              Hugging Face optimum (``ORTModelForCausalLM.from_pretrained(OUT)``) and
    generation_config.json   anything else that reads a transformers folder (and the tokenizer's
                             class named so that transformers 4, optimum's, loads it too)

What describes the graph (layers, heads, KV heads, head size, vocab, the names of its inputs) is read
off the written model.onnx itself (``decoder_signature``), not from the checkpoint: the files say
what the graph is. The runtimes' rules, as read in their sources and tested with their packages
(tests/test_deploy.py):

- onnxruntime-genai feeds input_ids, attention_mask (B, total length), position_ids, and with
  ``past_present_share_buffer`` one past/present buffer per layer of ``max_length`` positions that
  GroupQueryAttention updates in place (its past sequence length comes from the mask, as in ours).
  It binds logits of (B, new tokens, vocab): ``logits_to_keep`` has a default of 0 (all positions)
  in the graph, so a runtime that does not know it may leave it out.
- Its model ``type`` picks the runtime class: every type it lists as a language model runs the same
  decoder loop over the graph's own inputs, and "decoder" is its generic one. A family's row in the
  family table names its genai type where genai lists it (so older genai versions load it too), and
  "decoder" otherwise (genai's "gpt2" is a different graph: one past tensor per layer).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from awq_graph.emit.families import family_of
from awq_graph.core.cache_names import CONTEXT_KEY, PAST, PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE

# the search defaults genai's own builder writes, where the checkpoint's generation_config is silent
SEARCH_DEFAULTS = {"do_sample": False, "num_beams": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                   "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
                   "diversity_penalty": 0.0, "num_return_sequences": 1}


@dataclass(frozen=True)
class DecoderSignature:
    """What a KV-cache decoder's file says of itself: its cache and its inputs."""

    layers: int
    heads: int  # GroupQueryAttention's num_heads
    kv_heads: int
    head_dim: int
    vocab: int
    float_type: str  # "float32" or "float16": the logits' and the cache's type
    inputs: tuple[str, ...]
    context: int | None  # the positions the model was written for (metadata), if recorded


def decoder_signature(path: Path) -> DecoderSignature | None:
    """The signature of the fused decoder at ``path`` (its tensors are not read); None for a graph
    without a cache (logits-only) or without GroupQueryAttention (the generic decoder)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    if PAST_KEY % 0 not in inputs:
        return None
    layers = sum(1 for name in inputs if name.startswith(PAST) and name.endswith(".key"))
    dims = inputs[PAST_KEY % 0].type.tensor_type.shape.dim
    logits = next(o for o in graph.output if o.name == "logits")
    attention = next((n for n in graph.node if n.op_type == "GroupQueryAttention"), None)
    if attention is None:
        return None
    heads = next(a.i for a in attention.attribute if a.name == "num_heads")
    elem = inputs[PAST_KEY % 0].type.tensor_type.elem_type
    context = {p.key: p.value for p in model.metadata_props}.get(CONTEXT_KEY)
    defaults = {t.name for t in graph.initializer}  # an input with a default (logits_to_keep) need not be fed
    return DecoderSignature(layers, heads, dims[1].dim_value, dims[3].dim_value,
                            logits.type.tensor_type.shape.dim[-1].dim_value,
                            "float16" if elem == onnx.TensorProto.FLOAT16 else "float32",
                            tuple(name for name in inputs if name not in defaults), int(context) if context else None)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def genai_config(signature: DecoderSignature, genai_type: str, config, generation=None, tokenizer=None,
                 filename: str = "model.onnx") -> dict:
    """onnxruntime-genai's config for the decoder ``signature`` describes. ``config``: the checkpoint's
    transformers config; ``generation``: its GenerationConfig (search defaults, stop ids)."""
    def ids(name: str) -> list[int]:  # of the generation config, else the model's, else the tokenizer's;
        for source in (generation, config, tokenizer):  # ids outside the vocab (a config's stale
            found = [i for i in _ids(getattr(source, name, None)) if 0 <= i < signature.vocab]  # default) are
            if found:  # never generated, and genai refuses them
                return found
        return []

    eos = ids("eos_token_id")
    tokenizer_eos = getattr(tokenizer, "eos_token_id", None)
    if tokenizer_eos is not None and tokenizer_eos not in eos and 0 <= tokenizer_eos < signature.vocab:
        eos.append(int(tokenizer_eos))
    bos = next(iter(ids("bos_token_id")), None)
    pad = next(iter(ids("pad_token_id") or eos), None)
    context = signature.context or getattr(config, "max_position_embeddings", None) or 2048
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE}
    if "position_ids" in signature.inputs:
        inputs["position_ids"] = "position_ids"
    decoder = {"session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
               "filename": filename, "head_size": signature.head_dim,
               "hidden_size": int(getattr(config, "hidden_size", signature.heads * signature.head_dim)),
               "inputs": inputs,
               "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
               "num_attention_heads": signature.heads, "num_hidden_layers": signature.layers,
               "num_key_value_heads": signature.kv_heads}
    model = {"bos_token_id": bos, "context_length": int(context), "decoder": decoder, "eos_token_id": eos,
             "pad_token_id": pad, "type": genai_type, "vocab_size": signature.vocab}
    search = {name: _setting(generation, name, default) for name, default in SEARCH_DEFAULTS.items()}
    # GroupQueryAttention writes the new keys into the past buffer it was given
    search.update(early_stopping=True, max_length=int(context), min_length=0, past_present_share_buffer=True)
    return {"model": {k: v for k, v in model.items() if v is not None}, "search": search}


def _setting(generation, name: str, default):
    value = getattr(generation, name, None)
    return default if value is None else type(default)(value)


def write_runtime_files(folder: Path, model, tokenizer=None) -> list[str]:
    """genai_config.json, config.json and generation_config.json in ``folder`` beside its
    model.onnx (a fused KV-cache decoder of ``model``); the names of the files written (none for a
    logits-only graph or the generic decoder, whose cache onnxruntime-genai does not run)."""
    family, _ = family_of(model)
    signature = decoder_signature(folder / "model.onnx") if family is not None else None
    if signature is None:
        return []
    generation = getattr(model, "generation_config", None)
    config = model.config
    genai = genai_config(signature, family.genai, config, generation, tokenizer)
    (folder / "genai_config.json").write_text(json.dumps(genai, indent=4) + "\n")
    written = ["genai_config.json"]
    config.save_pretrained(folder)  # config.json
    written.append("config.json")
    if generation is not None:
        generation.save_pretrained(folder)
        written.append("generation_config.json")
    portable_tokenizer_class(folder)
    return written


def portable_tokenizer_class(folder: Path) -> bool:
    """A tokenizer transformers 5 saved as its plain tokenizers-backed class names it
    "TokenizersBackend", which transformers 4 (optimum-onnx 0.1's) cannot load; both load it by its
    older name, "PreTrainedTokenizerFast" (the same class in 5). Under that name transformers 4 also
    returns token_type_ids unless told the model's inputs, which for this graph are input_ids and
    attention_mask. True when the config was changed."""
    path = folder / "tokenizer_config.json"
    if not path.exists():
        return False
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") != "TokenizersBackend":
        return False
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.setdefault("model_input_names", ["input_ids", "attention_mask"])
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return True
