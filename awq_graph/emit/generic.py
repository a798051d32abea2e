"""The generic KV-cache decoder: for an architecture outside the fused families, torch.onnx of
the model itself with its cache as inputs and outputs.

    inputs   input_ids (B, S)[, attention_mask (B, P + S)][, position_ids (B, S)], per layer
             past_key_values.{i}.key / .value (B, kv_heads, P, head_dim) and, for a layer with
             linear attention (Mamba, gated delta nets, short convolutions),
             past_key_values.{i}.conv.{s} / .recurrent.{s} (B, ...: a fixed shape), for one
             with sparse attention (DeepSeek-V3.2) its indexer's past_key_values.{i}.indexer_key (B, P, dim)
    outputs  logits (B, S, V), present.{i}.* (keys and values P + S long; states as fed)

The model runs with transformers' own ``DynamicCache`` built from the past tensors (so the
architecture's own attention, masks, rotary, convolutions and cache update are what is
exported), traced by torch.export with ``Dim.AUTO`` (the sequence, past and total lengths are
related; torch works out how), translated by torch.onnx, each quantized linear then rewritten to
MatMulNBits like the logits-only graph. The cache grows by concatenation (a new present per step,
not the fused decoder's shared buffer): the runtime feeds each present back as the next past.

A layer with a sliding window keeps every key: the window is applied by the model's own mask
(which reads ``config.sliding_window``), so the graph is exact, and its cache is as long as the
context, not the window. Where a layer keeps linear-attention states, or where torch.export
fixed the program's length (a loop over positions unrolled), the graph takes one token per step
(S = 1; the runtime feeds a prompt token by token): transformers' multi-token path of several
such architectures starts the state afresh, and the one-token path is the one generation takes.
States start as zeros, which is what a prefill starts from.

Refused (the logits-only graph is written instead, with the reason): a cache of other kinds (a
sliding window inside a linear-attention layer, a model's own cache class, no cache), an export
or translation that fails. Checked after writing like the fused decoder: a prefill and one-token
steps against the cache in onnxruntime, against the torch program with the same dequantized
weights.
"""
from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass

import onnx_ir as ir
import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from awq_graph.core.errors import ExportError, first_line
from awq_graph.core.ir import GraphModel
from awq_graph.emit.logits_only import custom_translations, onnx_failure
from awq_graph.export import input_shape
from awq_graph.core.cache_names import KV_CACHE_KEY, PAST, PRESENT



class GenericUnsupported(ExportError):
    """This model gets no generic KV-cache decoder (the reason says why)."""


@dataclass(frozen=True)
class CacheEntry:
    """One tensor of one layer's cache: keys or values (``(heads, past, head_dim)``), a sparse
    attention's indexer keys (``(past, dim)``), each growing by the step's tokens, or a
    linear-attention layer's convolution or recurrent state (fixed shape); without the batch."""
    layer: int
    kind: str  # "key", "value", "indexer_key", "conv" or "recurrent"
    state: int  # which of a linear-attention layer's states (0 for keys and values)
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.kind}" + (f".{self.state}" if self.kind in STATES else "")

    @property
    def grows(self) -> bool:
        return self.kind not in STATES

    @property
    def axis(self) -> int:
        """The growing axis, counting the batch."""
        return 1 if self.kind == "indexer_key" else 2


STATES = ("conv", "recurrent")


@dataclass(frozen=True)
class CacheLayout:
    entries: list[CacheEntry]
    states: bool  # some layer keeps linear-attention states: the graph takes one token per step
    typed: bool  # the cache is built as the config asks (states, indexer keys), not all plain layers


class CachedLM(torch.nn.Module):
    """``(input_ids[, attention_mask][, position_ids], *past) -> (logits, *present)`` over a
    transformers causal LM, its cache a ``DynamicCache`` holding the past tensors."""

    def __init__(self, lm: torch.nn.Module, layout: CacheLayout, positions: bool, mask: bool):
        super().__init__()
        self.lm, self.layout, self.positions, self.mask = lm, layout, positions, mask

    def forward(self, input_ids, *rest):
        rest = list(rest)
        attention_mask = rest.pop(0) if self.mask else None
        position_ids = rest.pop(0) if self.positions else None
        cache = _cache_holding(self.lm.config, self.layout, rest)
        kwargs = {"position_ids": position_ids} if self.positions else {}
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                      **_cache_argument(self.lm, cache), **kwargs)
        return (out.logits, *(_held(_cache_of(out), entry) for entry in self.layout.entries))


def _cache_holding(config, layout: CacheLayout, past: list):
    """A DynamicCache holding ``past``. Keys and values only: every layer a plain DynamicLayer
    (no config), which keeps every key, a sliding-window layer's too: its window is the model's
    mask, which reads ``config.sliding_window``. With linear-attention states or indexer keys:
    the layers the config asks for, a sliding window made a plain layer, each state held as after
    a previous step (zeros before the first token are what a prefill starts from)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cache = DynamicCache(config=config) if layout.typed else DynamicCache()
    if layout.typed:
        cache.layers = [DynamicLayer() if type(layer) is DynamicSlidingWindowLayer else layer for layer in cache.layers]
    keys = {}
    for entry, tensor in zip(layout.entries, past):
        if entry.kind == "key":
            keys[entry.layer] = tensor
        elif entry.kind == "value":
            while len(cache.layers) <= entry.layer:  # the lazy plain cache
                cache.layers.append(DynamicLayer())
            cache.layers[entry.layer].update(keys.pop(entry.layer), tensor)
        elif entry.kind == "indexer_key":
            cache.layers[entry.layer].update_indexer(tensor)
        else:
            layer = cache.layers[entry.layer]
            _states(layer, entry.kind)[entry.state] = tensor.clone()  # updated in place; the input stays as fed
            getattr(layer, f"is_{entry.kind}_states_initialized")[entry.state] = True
            if entry.kind == "conv":
                layer.conv_kernel_size[entry.state] = int(tensor.shape[-1])
            layer.has_previous_state[entry.state] = True
            layer.dtype, layer.device = tensor.dtype, tensor.device
    return cache


def _held(cache, entry: CacheEntry):
    layer = cache.layers[entry.layer]
    if entry.kind == "key":
        return layer.keys
    if entry.kind == "value":
        return layer.values
    if entry.kind == "indexer_key":
        return layer.indexer_keys
    return _states(layer, entry.kind)[entry.state]


def _states(layer, kind: str) -> dict:
    """A linear-attention cache layer's states of ``kind`` ("conv" or "recurrent"), by index."""
    return layer.conv_states if kind == "conv" else layer.recurrent_states


ACCEPTED_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer", "DynamicIndexedLayer", "LinearAttentionLayer",
                   "LinearAttentionAndFullAttentionLayer", "DummyLayer")


def cache_layout(model) -> CacheLayout:
    """What each layer's cache holds, read off the cache of a 3-token prefill of the float model
    (its shapes without the batch); refuses a cache of other kinds (a sliding window within a
    linear-attention layer, a model's own cache class)."""
    from transformers import DynamicCache
    from transformers.cache_utils import CacheLayerMixin, DynamicIndexedLayer, LinearAttentionCacheLayerMixin

    config = model.config
    try:
        probe = DynamicCache(config=config)
    except Exception as exc:
        raise GenericUnsupported(f"its cache cannot be built from the config ({first_line(exc, 300)})") from exc
    kinds = {type(layer).__name__ for layer in probe.layers}
    if not probe.layers or not kinds <= set(ACCEPTED_LAYERS):
        raise GenericUnsupported(f"its cache is not keys and values or linear-attention states in every layer "
                                 f"({', '.join(sorted(kinds)) or 'none'})")
    states = any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in probe.layers)
    typed = states or any(isinstance(layer, DynamicIndexedLayer) for layer in probe.layers)
    if not typed:
        probe = DynamicCache()  # what CachedLM builds: every layer keeps every key
    try:
        with torch.no_grad():
            out = model(input_ids=torch.ones(1, 3, dtype=torch.long), use_cache=True, **_cache_argument(model, probe))
    except Exception as exc:  # the model's own code, with a cache: anything
        raise GenericUnsupported(f"its forward with a cache failed ({first_line(exc, 300)})") from exc
    if _cache_of(out) is not probe:
        raise GenericUnsupported("its forward returns no cache")
    entries = []
    for i, layer in enumerate(probe.layers):
        if isinstance(layer, CacheLayerMixin):
            if layer.keys is None or layer.keys.dim() != 4:
                raise GenericUnsupported("a layer keeps no 4-D keys in its cache")
            entries += [CacheEntry(i, "key", 0, tuple(layer.keys.shape[1:])),
                        CacheEntry(i, "value", 0, tuple(layer.values.shape[1:]))]
        if isinstance(layer, DynamicIndexedLayer):
            if layer.indexer_keys is None or layer.indexer_keys.dim() != 3:
                raise GenericUnsupported("a sparse-attention layer keeps no 3-D indexer keys in its cache")
            entries.append(CacheEntry(i, "indexer_key", 0, tuple(layer.indexer_keys.shape[1:])))
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for s in range(layer.number_of_states):
                for kind in STATES:
                    tensor = _states(layer, kind)[s]
                    if tensor is not None:
                        entries.append(CacheEntry(i, kind, s, tuple(tensor.shape[1:])))
    if not entries:
        raise GenericUnsupported("its cache holds nothing after a prefill")
    return CacheLayout(entries, states, typed)


def one_token_per_step(layout: CacheLayout, gm: GraphModel) -> bool:
    """Whether the graph takes one token per step: a layer keeps linear-attention states
    (transformers' multi-token path of several such architectures restarts the state), or
    torch.export fixed the program's length."""
    return layout.states or bool(gm.fixed_seq)


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
    """torch.onnx of ``CachedLM`` over the model with the program's folded weights (float); its
    sequence length fixed at 1 (a prompt fed token by token) where ``one_token_per_step``."""
    layout = cache_layout(model)
    one_token = one_token_per_step(layout, gm)
    positions = counts_positions_from_zero(model)
    # a model without attention layers reads the mask as the step's own tokens' (Mamba): none given
    mask = any(entry.grows for entry in layout.entries)
    wrapper = CachedLM(with_folded_weights(model, gm), layout, positions, mask).eval()
    batch, seq, past_len = 2, 1 if one_token else 4, 3
    gen = torch.Generator().manual_seed(0)
    vocab = int(model.get_input_embeddings().num_embeddings)
    auto = torch.export.Dim.AUTO
    args, names, dynamic = [torch.randint(0, vocab, (batch, seq), generator=gen)], ["input_ids"], \
        [{0: auto} if one_token else {0: auto, 1: auto}]
    if mask:
        args.append(torch.ones(batch, past_len + seq, dtype=torch.long))
        names.append("attention_mask")
        dynamic.append({0: auto, 1: auto})
    if positions:
        args.append(torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous())
        names.append("position_ids")
        dynamic.append({0: auto} if one_token else {0: auto, 1: auto})
    for entry in layout.entries:
        shape = list(entry.shape)
        if entry.grows:
            shape[entry.axis - 1] = past_len
        args.append(torch.randn(batch, *shape, generator=gen))
        names.append(f"{PAST}{entry.name}")
        dynamic.append({0: auto, entry.axis: auto} if entry.grows else {0: auto})
    outputs = ["logits"] + [f"{PRESENT}{entry.name}" for entry in layout.entries]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(wrapper, tuple(args), dynamic_shapes=(dynamic[0], tuple(dynamic[1:])), strict=False)
    except Exception as exc:
        raise GenericUnsupported(f"torch.export with the cache failed: {first_line(exc, 300)}") from exc
    ids = input_shape(program, 0)
    lengths = [ids[0]] + ([] if one_token else [ids[1]])
    grown = next((e for e in layout.entries if e.grows), None)  # every past grows with the same length
    if grown is not None:
        lengths.append(input_shape(program, names.index(f"{PAST}{grown.name}"))[grown.axis])
    if any(is_concrete_int(d) for d in lengths):
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
