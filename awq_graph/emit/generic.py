"""The generic KV-cache decoder: for an architecture outside the fused families whose cache is
plain keys and values, torch.onnx of the model itself with the cache as inputs and outputs.

    inputs   input_ids (B, S), attention_mask (B, P + S)[, position_ids (B, S)],
             past_key_values.{i}.key / .value (B, kv_heads, P, head_dim) per decoder layer
    outputs  logits (B, S, V), present.{i}.key / .value (B, kv_heads, P + S, head_dim)

The model runs with transformers' own ``DynamicCache`` built from the past tensors (so the
architecture's own attention, masks, rotary and cache update are what is exported), traced by
torch.export with ``Dim.AUTO`` (the sequence, past and total lengths are related; torch works out
how), translated by torch.onnx, each quantized linear then rewritten to MatMulNBits like the
logits-only graph. The cache grows by concatenation (a new present per step, not the fused
decoder's shared buffer): the runtime feeds each present back as the next past.

A layer with a sliding window keeps every key too: the window is applied by the model's own mask
(which reads ``config.sliding_window``), so the graph is exact, and its cache is as long as the
context, not the window.

Refused (the logits-only graph is written instead, with the reason): a cache that is not keys
and values in every layer (recurrent or convolution states, indexed or shared KV),
a graph whose export fixed a length, an export or translation that fails. Checked after writing
like the fused decoder: a prefill and one-token steps against the cache in onnxruntime, against
the torch program with the same dequantized weights.
"""
from __future__ import annotations

import copy
import inspect
import warnings

import onnx_ir as ir
import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from awq_graph.core.errors import ExportError, first_line
from awq_graph.core.ir import GraphModel
from awq_graph.emit.logits_only import custom_translations, onnx_failure
from awq_graph.export import input_shape
from awq_graph.runtime import KV_CACHE_KEY, PAST

PRESENT = "present."


class GenericUnsupported(ExportError):
    """This model gets no generic KV-cache decoder (the reason says why)."""


class CachedLM(torch.nn.Module):
    """``(input_ids, attention_mask[, position_ids], *past) -> (logits, *present)`` over a
    transformers causal LM, its cache a ``DynamicCache`` of the past tensors."""

    def __init__(self, lm: torch.nn.Module, layers: int, positions: bool):
        super().__init__()
        self.lm, self.layers, self.positions = lm, layers, positions

    def forward(self, input_ids, attention_mask, *rest):
        from transformers import DynamicCache

        position_ids, past = (rest[0], rest[1:]) if self.positions else (None, rest)
        # no config: every layer a plain DynamicLayer that keeps every key (a sliding-window layer
        # too: its window is the model's mask, which reads config.sliding_window)
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        kwargs = {"position_ids": position_ids} if self.positions else {}
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                      **_cache_argument(self.lm, cache), **kwargs)
        present = []
        for layer in _cache_of(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def cache_shapes(model) -> list[tuple[int, ...]]:
    """(kv_heads, head_dim) of each layer's keys, then values, read off the cache of a 3-token
    prefill of the float model; refuses a cache that is not keys and values in every layer
    (plain or within a sliding window, which the graph's cache keeps whole)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    config = model.config
    try:
        probe = DynamicCache(config=config)
    except Exception as exc:
        raise GenericUnsupported(f"its cache cannot be built from the config ({first_line(exc, 300)})") from exc
    kinds = {type(layer).__name__ for layer in probe.layers}
    if not probe.layers or not kinds <= {DynamicLayer.__name__, DynamicSlidingWindowLayer.__name__}:
        raise GenericUnsupported(f"its cache is not keys and values in every layer ({', '.join(sorted(kinds)) or 'none'})")
    probe = DynamicCache()  # what CachedLM builds: every layer keeps every key
    try:
        with torch.no_grad():
            out = model(input_ids=torch.ones(1, 3, dtype=torch.long), use_cache=True, **_cache_argument(model, probe))
    except Exception as exc:  # the model's own code, with a cache: anything
        raise GenericUnsupported(f"its forward with a cache failed ({first_line(exc, 300)})") from exc
    if _cache_of(out) is not probe:
        raise GenericUnsupported("its forward returns no cache")
    shapes = []
    for layer in probe.layers:
        if layer.keys is None or layer.keys.dim() != 4:
            raise GenericUnsupported("a layer keeps no 4-D keys in its cache")
        shapes += [tuple(layer.keys.shape[1::2]), tuple(layer.values.shape[1::2])]
    return shapes


def counts_positions_from_zero(model) -> bool:
    """Whether the graph takes ``position_ids`` (what a runtime feeds: 0, 1, ... past the
    padding): the forward takes them and, given 0..S-1, computes what it computes without them.
    RoBERTa's count from its padding id + 1: its graph takes none and counts as the model does
    (from the ids and the cache's length)."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return False
    ids = torch.arange(3, 8).unsqueeze(0) % int(model.get_input_embeddings().num_embeddings)
    try:
        with torch.no_grad():
            own = model(input_ids=ids, use_cache=False).logits
            counted = model(input_ids=ids, position_ids=torch.arange(ids.shape[1]).unsqueeze(0), use_cache=False).logits
    except Exception as exc:  # the model's own code: anything
        raise GenericUnsupported(f"its forward with position ids failed ({first_line(exc, 300)})") from exc
    return bool(torch.allclose(own, counted, rtol=1e-4, atol=1e-5))


def with_folded_weights(model, gm: GraphModel):
    """``model`` when it holds the program's (folded) tensors, else a copy given them."""
    state = model.state_dict(keep_vars=True)
    shared = all(state[name] is tensor for name, tensor in gm.params.items() if name in state)
    if shared:
        return model
    twin = copy.deepcopy(model)
    twin_state = twin.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in gm.params.items():
            if name in twin_state:
                twin_state[name].copy_(tensor)
    return twin


def export_cached_onnx(model, gm: GraphModel) -> ir.Model:
    """torch.onnx of ``CachedLM`` over the model with the program's folded weights (float)."""
    if gm.fixed_seq:
        raise GenericUnsupported(f"torch.export fixed its sequence length to {gm.fixed_seq}")
    shapes = cache_shapes(model)
    layers = len(shapes) // 2
    positions = counts_positions_from_zero(model)
    wrapper = CachedLM(with_folded_weights(model, gm), layers, positions).eval()
    batch, seq, past_len = 2, 4, 3
    gen = torch.Generator().manual_seed(0)
    vocab = int(model.get_input_embeddings().num_embeddings)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    args = [ids, torch.ones(batch, past_len + seq, dtype=torch.long)]
    if positions:
        args.append(torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous())
    args += [torch.randn(batch, heads, past_len, dim, generator=gen) for heads, dim in shapes]
    auto = torch.export.Dim.AUTO
    dynamic = {"input_ids": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto},
               "rest": tuple([{0: auto, 1: auto}] * positions + [{0: auto, 2: auto}] * len(shapes))}
    names = ["input_ids", "attention_mask"] + (["position_ids"] if positions else [])
    names += [f"{PAST}{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    outputs = ["logits"] + [f"{PRESENT}{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(wrapper, tuple(args), dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        raise GenericUnsupported(f"torch.export with the cache failed: {first_line(exc, 300)}") from exc
    ids, last_past = input_shape(program, 0), input_shape(program, len(names) - 1)
    if any(is_concrete_int(d) for d in (ids[0], ids[1], last_past[2])):
        raise GenericUnsupported("torch.export fixed the batch, sequence or past length of the cached graph")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, tuple(args), dynamo=True, optimize=False, external_data=True,
                                             verbose=False, input_names=names, output_names=outputs,
                                             custom_translation_table=custom_translations())
    except Exception as exc:
        raise GenericUnsupported(f"torch.onnx of the cached graph failed: {onnx_failure(exc)}") from exc
    onnx_model = onnx_program.model
    onnx_model.metadata_props[KV_CACHE_KEY] = "concat"
    return onnx_model


def _cache_argument(model, cache) -> dict:
    """The cache as the model's forward takes it: ``cache`` (transformers 5.24 on), else
    ``past_key_values``."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
