"""Emit a KV-cache decoder built from onnxruntime's fused ops (llama, mistral, qwen2, qwen3, gemma, gemma2,
gemma3_text, phi3, granite, and the MoE models mixtral, qwen2_moe, qwen3_moe, olmoe).

One file serves prefill and decode:

    inputs   input_ids (B, S) int64, attention_mask (B, T) int64 with T = P + S,
             position_ids (B, S) int64, past_key_values.{i}.key / .value (B, kv_heads, P, head_dim),
             logits_to_keep () int64: logits of the last k positions only (0: all)
    outputs  logits (B, S or k, vocab), present.{i}.key / .value (B, kv_heads, T, head_dim)

Per decoder layer (every linear a MatMulNBits when quantized, a MatMul otherwise):

    SkipSimplifiedLayerNormalization   residual add + RMSNorm in one op
    q|k|v                              one MatMulNBits over the rows of q, k and v
    RotaryEmbedding on q and k         at position_ids
    GroupQueryAttention                causal attention over past + new keys; returns present
    o                                  then the next SkipSimplifiedLayerNormalization
    gate, up -> act(gate) * up -> down  (SiLU; GELU-tanh for gemma)
    gemma2/3: sandwich norms           SimplifiedLayerNormalization after o and after down; local or
                                       global attention per layer; c * tanh(x / c) on scores (and logits)
    MoE: router MatMul, then QMoE      over the int4 expert banks (top-k, SwiGLU); qwen2_moe adds
                                       sigmoid(shared_expert_gate) * its shared expert's MLP

The embedding is a Gather over the float table, or GatherBlockQuantized over an int4 copy of
it. The graph is written from the model's config and its (folded) parameters; ``fused_support``
says which models it fits, and the pipeline checks the result against the torch program.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir
import torch

from awq_graph.core import cache_names
from awq_graph.core.group_fit import GroupFit
from awq_graph.emit.builder import (GraphBuilder, GraphFacts, LinearWeights, attention_lengths, embedding, lazy_param,
                                    head_and_model, keep_last, linear, out_rows, signature)
from awq_graph.emit.families import DecoderShape, Family, Names
from awq_graph.head_table import TokenTable

ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def fused_support(model, family: Family, fit: GroupFit | None = None) -> str | None:
    """None when the fused decoder fits ``model`` of ``family`` (quantized in the groups of
    ``fit``); otherwise the reason it does not."""
    cfg = model.config
    if _activation(cfg) not in ACTIVATIONS:
        return f"activation '{_activation(cfg)}' (the fused decoder has {', '.join(ACTIVATIONS)})"
    if getattr(cfg, "mlp_bias", False):
        return "MLP biases"
    if getattr(cfg, "attention_bias", False) and not family.qkv_bias:
        return "attention biases on the output projection"
    rope = getattr(cfg, "rope_parameters", None) or {}
    for params in rope.values() if all(isinstance(v, dict) for v in rope.values()) and rope else [rope]:
        if params.get("rope_type", "default") in ("dynamic", "longrope"):  # gemma3: one entry per layer type
            return f"rope type '{params['rope_type']}' (positions would change the cos/sin tables)"
    if family.moe:
        if _activation(cfg) != "silu":
            return f"experts gated by '{_activation(cfg)}' (onnxruntime's QMoE gates with SiLU)"
        inter_key = "moe_intermediate_size" if hasattr(cfg, "moe_intermediate_size") else "intermediate_size"
        sizes = {"hidden_size": cfg.hidden_size, inter_key: getattr(cfg, inter_key)}
        refusal = fit.expert_refusal(sizes) if fit is not None else None
        if refusal:
            return refusal
    return None


def _activation(cfg) -> str | None:
    return getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)


def decoder_shape(model, family: Family, facts: GraphFacts) -> DecoderShape:
    cfg = model.config
    attn = model.get_submodule(f"{facts.layer(0)}.{family.names.attention}")
    embed = model.get_submodule(facts.embedding)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layer_types = tuple(cfg.layer_types) if family.sandwich else ()  # local or global attention per layer
    cos, _ = _rotary_tables(model, family.names, 1, layer_types[0] if layer_types else None)
    window = -1
    uses_window = family.sliding_window or getattr(cfg, "use_sliding_window", False)
    if uses_window and getattr(cfg, "sliding_window", None):
        window = int(cfg.sliding_window)
    return DecoderShape(
        layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, head_dim=head_dim,
        rotary_dim=cos.shape[-1], vocab=cfg.vocab_size, eps=float(cfg.rms_norm_eps), scaling=float(attn.scaling),
        max_positions=int(cfg.max_position_embeddings), window=window,
        activation=ACTIVATIONS[_activation(cfg)],
        embed_scale=float(embed.embed_scale) if hasattr(embed, "embed_scale")
        else float(cfg.embedding_multiplier) if family.multipliers else None,
        experts_per_token=int(cfg.num_experts_per_tok) if family.moe else 0,
        renormalize=bool(getattr(cfg, "norm_topk_prob", True)),
        sandwich=family.sandwich, attn_softcap=float(getattr(cfg, "attn_logit_softcapping", None) or 0.0),
        final_softcap=float(getattr(cfg, "final_logit_softcapping", None) or 0.0), layer_types=layer_types,
        clip_qkv=float(getattr(cfg, "clip_qkv", None) or 0.0),
        residual_scale=float(cfg.residual_multiplier) if family.multipliers else 1.0,
        logits_divisor=float(cfg.logits_scaling) if family.multipliers else 1.0)


def _rotary_tables(model, names: Names, positions: int, layer_type: str | None = None):
    """cos and sin (positions, rotary_dim) from the model's own rotary module (any scaling);
    gemma3's module keeps one table per layer type."""
    rotary = model.get_submodule(names.rotary)
    with torch.no_grad():
        pos = torch.arange(positions).unsqueeze(0)
        extra = (layer_type,) if layer_type and _per_layer_type(rotary) else ()
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos, *extra)
    return cos[0].float(), sin[0].float()


def _per_layer_type(rotary) -> bool:
    import inspect

    return "layer_type" in inspect.signature(rotary.forward).parameters


def build_decoder(model, family: Family, facts: GraphFacts, params: dict[str, torch.Tensor],
                  linears: dict[str, LinearWeights], *, quantized_table: TokenTable | None = None,
                  accuracy_level: int = 0, act_dtype: str = "float32", layers: list[int] | None = None) -> ir.Model:
    """The fused KV-cache decoder of ``model`` with the given (folded) parameters.

    params: HF name -> tensor (norm weights, the embedding table). linears: HF module name
    (``model.layers.0.self_attn.q_proj``, the head) -> its weights. quantized_table: the token
    table's int4 integers (GatherBlockQuantized), or None for the float table. layers: which
    decoder layers, in order (None: all); the k-th written one reads cache slot k (the check's
    shallow decoder).
    """
    shape = decoder_shape(model, family, facts)
    names = family.names
    ftype = ir.DataType.FLOAT16 if act_dtype == "float16" else ir.DataType.FLOAT
    order = list(range(shape.layers)) if layers is None else list(layers)
    inputs, outputs = signature(replace(shape, layers=len(order)), ftype)
    g = GraphBuilder(ftype, inputs, "awq_graph_decoder")
    half = shape.rotary_dim // 2
    rotary = {}  # layer type (None: every layer) -> (cos cache, sin cache)
    for kind in sorted(set(shape.layer_types)) if _per_layer_type(model.get_submodule(names.rotary)) else [None]:
        cos, sin = _rotary_tables(model, names, shape.max_positions, kind)
        tag = f"rotary.{kind}" if kind else "rotary"
        rotary[kind] = (g.floats(f"{tag}.cos_cache", cos[:, :half]), g.floats(f"{tag}.sin_cache", sin[:, :half]))

    lengths = attention_lengths(g)  # shared by every layer's attention

    def norm(delta, residual, x, module):
        return _norm(g, delta, residual, x, facts.norm_factor(params, module), module, shape.eps)

    embed = facts.embedding
    x = embedding(g, "input_ids", lazy_param(params, facts.table), quantized_table, embed)
    if shape.embed_scale is not None:
        x = g.op("Mul", [x, g.floats(f"{embed}.embed_scale", np.array(shape.embed_scale))], f"{embed}/Mul")
    residual = None
    delta = None
    for slot, i in enumerate(order):
        p = facts.layer(i)
        h, residual = norm(delta, residual, x, f"{p}.{names.input_norm}")
        tables = rotary[shape.layer_types[i] if None not in rotary else None]
        attn_out = _attention(g, h, i, slot, f"{p}.{names.attention}", names, facts, params, linears, shape, tables,
                              lengths, accuracy_level)
        o_proj = f"{p}.{names.attention}.{names.o}"
        o = _residual_scale(g, linear(g, attn_out, linears[o_proj], o_proj, accuracy_level), shape,
                            f"{p}.{names.attention}")
        if shape.sandwich:  # o is normed on its own, and the MLP's input norm is the pre-MLP one
            o, _ = norm(None, None, o, f"{p}.{names.post_attention_norm}")
        mlp_norm = names.pre_mlp_norm if shape.sandwich else names.post_attention_norm
        h, residual = norm(o, residual, None, f"{p}.{mlp_norm}")
        m = f"{p}.{names.mlp}"
        block = moe_block if f"{m}.{names.experts_gate_up}" in linears else _mlp
        delta = _residual_scale(g, block(g, h, m, names, linears, shape, accuracy_level), shape, m)
        if shape.sandwich:
            delta, _ = norm(None, None, delta, f"{p}.{names.post_mlp_norm}")
    delta, residual = keep_last(g, delta, residual)
    h, _ = norm(delta, residual, x, names.final_norm)
    return head_and_model(g, h, linears[facts.head], facts.head, f"{embed}.weight", quantized_table, accuracy_level, shape,
                          facts.tied_head, outputs)


def _residual_scale(g: GraphBuilder, x: str, shape: DecoderShape, name: str) -> str:
    if shape.residual_scale == 1.0:
        return x
    return g.op("Mul", [x, g.floats(f"{name}.residual_scale", np.array(shape.residual_scale))], f"{name}/residual_Mul")


def _attention(g: GraphBuilder, h: str, i: int, slot: int, a: str, names: Names, facts: GraphFacts, params, linears,
               shape: DecoderShape, rotary, lengths, accuracy_level: int) -> str:
    """q|k|v projection, rotary at position_ids, GroupQueryAttention over cache ``slot`` (layer ``i``)."""
    cos_cache, sin_cache = rotary
    seqlens, total = lengths
    fused_qkv = linears.get(f"{a}.{names.qkv}")  # phi3 stores q|k|v as one linear already
    attn = fused_qkv or LinearWeights.concat([linears[f"{a}.{n}"] for n in (names.q, names.k, names.v)])
    qkv = linear(g, h, attn, f"{a}.{names.qkv}", accuracy_level)
    past = [cache_names.past(slot, "key"), cache_names.past(slot, "value"), seqlens, total]
    outs = [f"{a}/out", cache_names.present(slot, "key"), cache_names.present(slot, "value")]
    attrs = dict(domain="com.microsoft", num_heads=shape.heads, kv_num_heads=shape.kv_heads, scale=shape.scaling,
                 local_window_size=shape.layer_window(i))
    if shape.attn_softcap:
        attrs["softcap"] = shape.attn_softcap
    # rotary as its own op, at position_ids: GroupQueryAttention's built-in rotary (one op less per
    # layer, no measurable gain on SmolLM2) derives positions from the mask and ignores position_ids on CPU
    q, k, v = g.op("Split", [qkv, g.const(f"{a}.split", np.array(
        [shape.q_size, shape.kv_size, shape.kv_size], np.int64))], f"{a}/Split", outputs=3, axis=-1)
    if f"{a}.{names.q_norm}.weight" in params:  # per head (qwen3, gemma3) or over all of q and k (olmoe)
        q = _head_norm(g, q, facts.norm_factor(params, f"{a}.{names.q_norm}"), f"{a}.{names.q_norm}", shape)
        k = _head_norm(g, k, facts.norm_factor(params, f"{a}.{names.k_norm}"), f"{a}.{names.k_norm}", shape)
    if shape.clip_qkv:  # olmoe: q, k (after their norms) and v clamped to [-c, c]
        bounds = [g.floats(f"{a}.clip_min", np.array(-shape.clip_qkv)),
                  g.floats(f"{a}.clip_max", np.array(shape.clip_qkv))]
        q, k, v = (g.op("Clip", [t, *bounds], f"{a}/{n}_Clip") for t, n in ((q, "q"), (k, "k"), (v, "v")))
    q = g.op("RotaryEmbedding", [q, "position_ids", cos_cache, sin_cache], f"{a}/q_rotary",
             domain="com.microsoft", num_heads=shape.heads, rotary_embedding_dim=shape.rotary_dim, interleaved=0)
    k = g.op("RotaryEmbedding", [k, "position_ids", cos_cache, sin_cache], f"{a}/k_rotary",
             domain="com.microsoft", num_heads=shape.kv_heads, rotary_embedding_dim=shape.rotary_dim, interleaved=0)
    attn_out, _, _ = g.op("GroupQueryAttention", [q, k, v, *past], f"{a}/GroupQueryAttention",
                          outputs=outs, **attrs)
    return attn_out


def _mlp(g: GraphBuilder, h: str, m: str, names: Names, linears, shape: DecoderShape, accuracy_level: int) -> str:
    """down(act(gate(h)) * up(h)); phi3's gate|up is one linear, split in halves."""
    if f"{m}.{names.gate_up}" in linears:  # phi3: gate and up as the two halves of one linear
        gate_up = linears[f"{m}.{names.gate_up}"]
        half = np.array([out_rows(gate_up) // 2] * 2, np.int64)
        gate, up = g.op("Split", [linear(g, h, gate_up, f"{m}.{names.gate_up}", accuracy_level),
                                  g.const(f"{m}.split", half)], f"{m}/Split", outputs=2, axis=-1)
    else:
        gate = linear(g, h, linears[f"{m}.{names.gate}"], f"{m}.{names.gate}", accuracy_level)
        up = linear(g, h, linears[f"{m}.{names.up}"], f"{m}.{names.up}", accuracy_level)
    act = _activate(g, gate, shape.activation, f"{m}.act_fn")
    return linear(g, g.op("Mul", [act, up], f"{m}/Mul"), linears[f"{m}.{names.down}"],
                  f"{m}.{names.down}", accuracy_level)


def moe_block(g: GraphBuilder, h: str, m: str, names: Names, linears, shape: DecoderShape,
              accuracy_level: int) -> str:
    """The router (float) picks ``experts_per_token`` of E experts per token; QMoE runs
    down(silu(gate(h)) * up(h)) of each over its int4 bank and sums them weighted by the
    softmax of the router logits at the picked experts, renormalized over them (QMoE's own
    weighting) or not (the full softmax passed in as router_weights). A shared expert
    (qwen2_moe) is added, gated."""
    r = f"{m}.{names.router}"
    router = linear(g, h, linears[r], r, accuracy_level)
    experts = out_rows(linears[r])
    logits = g.op("Reshape", [router, g.const(f"{m}.router_shape", np.array([-1, experts], np.int64))],
                  f"{r}/Reshape")  # (tokens, E)
    gate_up, down = linears[f"{m}.{names.experts_gate_up}"], linears[f"{m}.{names.experts_down}"]
    if gate_up.quantized is None or down.quantized is None:
        raise ValueError(f"{m}: the fused decoder writes quantized experts only")
    rows = gate_up.quantized.shape[0] // experts  # 2 * intermediate per expert: gate rows, then up rows
    # QMoE reads gate and up interleaved: row 2j is gate j, row 2j + 1 is up j
    per_expert = torch.stack([torch.arange(rows // 2), torch.arange(rows // 2) + rows // 2], 1).reshape(-1)
    order = (torch.arange(experts)[:, None] * rows + per_expert).reshape(-1)
    fc1 = g.nbits_bank(gate_up.quantized, f"{m}.{names.experts_gate_up}", experts, rows=order)
    fc2 = g.nbits_bank(down.quantized, f"{m}.{names.experts_down}", experts)
    scheme = gate_up.quantized.scheme
    inputs = [h, logits, fc1[0], fc1[1], None, fc2[0], fc2[1], None, None, None, None, fc1[2], fc2[2]]
    if not shape.renormalize:
        inputs += [None, g.op("Softmax", [logits], f"{r}/Softmax", axis=-1)]
    routed = g.op("QMoE", inputs,
                f"{m}/QMoE", domain="com.microsoft", k=shape.experts_per_token, activation_type="swiglu",
                swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=int(shape.renormalize),
                expert_weight_bits=scheme.bits, block_size=scheme.group_size, accuracy_level=accuracy_level)
    shared, shared_gate = f"{m}.{names.shared_expert}", f"{m}.{names.shared_expert_gate}"
    if f"{shared}.{names.down}" not in linears:
        return routed
    # qwen2_moe: a dense expert every token takes, weighted by sigmoid(shared_expert_gate(h))
    dense = _mlp(g, h, shared, names, linears, shape, accuracy_level)
    weight = g.op("Sigmoid", [linear(g, h, linears[shared_gate], shared_gate, accuracy_level)], f"{shared_gate}/Sigmoid")
    return g.op("Add", [routed, g.op("Mul", [weight, dense], f"{shared_gate}/Mul")], f"{m}/Add")


def _norm(g: GraphBuilder, delta, residual, x, weight, name: str, eps: float):
    """RMSNorm of the residual stream; with ``delta``, first residual += delta (one fused op).
    Returns (normed, residual stream)."""
    w = g.floats(f"{name}.weight", weight)
    if delta is None:
        return g.op("SimplifiedLayerNormalization", [x, w], f"{name}/SimplifiedLayerNormalization",
                    axis=-1, epsilon=eps, stash_type=1), x
    normed, _, _, summed = g.op("SkipSimplifiedLayerNormalization", [delta, residual, w],
                                f"{name}/SkipSimplifiedLayerNormalization",
                                outputs=[f"{name}/out", "", "", f"{name}/residual"],
                                domain="com.microsoft", epsilon=eps)
    return normed, summed


def _activate(g: GraphBuilder, x: str, activation: str, name: str) -> str:
    if activation == "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x], f"{name}/Sigmoid")], f"{name}/Mul")
    return g.op("Gelu", [x], f"{name}/Gelu", approximate="tanh" if activation == "gelu_tanh" else "none")


def _head_norm(g: GraphBuilder, x: str, weight, name: str, shape: DecoderShape) -> str:
    """RMSNorm over each head_dim slice of (B, S, heads * head_dim); over the whole last axis
    when the weight covers every head (olmoe)."""
    if weight.numel() != shape.head_dim:
        return g.op("SimplifiedLayerNormalization", [x, g.floats(f"{name}.weight", weight)],
                    f"{name}/SimplifiedLayerNormalization", axis=-1, epsilon=shape.eps, stash_type=1)
    heads = g.op("Reshape", [x, g.const(f"{name}.heads", np.array([0, 0, -1, shape.head_dim], np.int64))],
                 f"{name}/Reshape")
    normed = g.op("SimplifiedLayerNormalization", [heads, g.floats(f"{name}.weight", weight)],
                  f"{name}/SimplifiedLayerNormalization", axis=-1, epsilon=shape.eps, stash_type=1)
    return g.op("Reshape", [normed, g.const(f"{name}.flat", np.array([0, 0, -1], np.int64))], f"{name}/Flatten")


