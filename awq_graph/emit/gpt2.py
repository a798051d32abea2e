"""Emit the KV-cache decoder for GPT-2: the same signature and cache as ``awq_graph.emit.decoder``,
GPT-2's block (module names from its family row).

    x = wte[input_ids] + wpe[position_ids]
    per layer: SkipLayerNormalization (LayerNorm with bias) -> MatMulNBits c_attn (q|k|v, bias)
               -> GroupQueryAttention (as many kv heads as heads, no rotary) -> c_proj
               -> SkipLayerNormalization -> c_fc -> GELU (tanh) -> c_proj
    ln_f -> lm_head
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir
import torch

from awq_graph.core import cache_names
from awq_graph.core.group_fit import GroupFit
from awq_graph.emit.builder import (GraphBuilder, GraphFacts, LinearWeights, attention_lengths, embedding, lazy_param,
                                    head_and_model, keep_last, linear, signature)
from awq_graph.emit.families import DecoderShape, Family
from awq_graph.head_table import TokenTable


def gpt2_support(model, family: Family, fit: GroupFit | None = None) -> str | None:
    cfg = model.config
    if cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        return f"activation '{cfg.activation_function}'"
    if cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn or getattr(cfg, "add_cross_attention", False):
        return "per-layer attention scaling, reordered attention or cross-attention"
    return None


def gpt2_shape(model) -> DecoderShape:
    cfg = model.config
    head_dim = cfg.n_embd // cfg.n_head
    return DecoderShape(
        layers=cfg.n_layer, hidden=cfg.n_embd, heads=cfg.n_head, kv_heads=cfg.n_head, head_dim=head_dim,
        rotary_dim=0, vocab=cfg.vocab_size, eps=float(cfg.layer_norm_epsilon),
        scaling=head_dim ** -0.5 if cfg.scale_attn_weights else 1.0, max_positions=int(cfg.n_positions), window=-1,
        activation="gelu" if cfg.activation_function == "gelu" else "gelu_tanh")


def build_gpt2_decoder(model, family: Family, facts: GraphFacts, params: dict[str, torch.Tensor],
                       linears: dict[str, LinearWeights], *, quantized_table: TokenTable | None = None,
                       accuracy_level: int = 0, act_dtype: str = "float32", layers: list[int] | None = None) -> ir.Model:
    """GPT-2's KV-cache decoder; ``layers`` as in ``awq_graph.emit.decoder.build_decoder``."""
    shape = gpt2_shape(model)
    names = family.names
    ftype = ir.DataType.FLOAT16 if act_dtype == "float16" else ir.DataType.FLOAT
    order = list(range(shape.layers)) if layers is None else list(layers)
    inputs, outputs = signature(replace(shape, layers=len(order)), ftype)
    g = GraphBuilder(ftype, inputs, "awq_graph_gpt2_decoder")
    seqlens, total = attention_lengths(g)
    embed = facts.embedding
    tokens = embedding(g, "input_ids", lazy_param(params, facts.table), quantized_table, embed)
    positions = g.op("Gather", [g.floats(f"{names.positions}.weight", params[f"{names.positions}.weight"]),
                                "position_ids"], f"{names.positions}/Gather")
    x = g.op("Add", [tokens, positions], "embeddings/Add")
    residual, delta = x, None
    for slot, i in enumerate(order):
        p = facts.layer(i)
        a, m = f"{p}.{names.attention}", f"{p}.{names.mlp}"
        h, residual = _layer_norm(g, delta, residual, params, f"{p}.{names.input_norm}", shape.eps)
        qkv = linear(g, h, linears[f"{a}.{names.qkv}"], f"{a}.{names.qkv}", accuracy_level)
        q, k, v = g.op("Split", [qkv, g.const(f"{a}.split", np.array([shape.hidden] * 3, np.int64))],
                       f"{a}/Split", outputs=3, axis=-1)
        attn_out, _, _ = g.op("GroupQueryAttention",
                              [q, k, v, cache_names.past(slot, "key"), cache_names.past(slot, "value"), seqlens, total],
                              f"{a}/GroupQueryAttention",
                              outputs=[f"{a}/out", cache_names.present(slot, "key"), cache_names.present(slot, "value")],
                              domain="com.microsoft", num_heads=shape.heads, kv_num_heads=shape.kv_heads,
                              scale=shape.scaling)
        o = linear(g, attn_out, linears[f"{a}.{names.o}"], f"{a}.{names.o}", accuracy_level)
        h, residual = _layer_norm(g, o, residual, params, f"{p}.{names.post_attention_norm}", shape.eps)
        up = linear(g, h, linears[f"{m}.{names.up}"], f"{m}.{names.up}", accuracy_level)
        act = g.op("Gelu", [up], f"{m}.act/Gelu", approximate="tanh" if shape.activation == "gelu_tanh" else "none")
        delta = linear(g, act, linears[f"{m}.{names.down}"], f"{m}.{names.down}", accuracy_level)
    delta, residual = keep_last(g, delta, residual)
    h, _ = _layer_norm(g, delta, residual, params, names.final_norm, shape.eps)
    return head_and_model(g, h, linears[facts.head], facts.head, f"{embed}.weight", quantized_table, accuracy_level, shape,
                          facts.tied_head, outputs)


def _layer_norm(g: GraphBuilder, delta, residual, params, name: str, eps: float):
    """LayerNorm (with bias) of residual (+ delta, fused). Returns (normed, residual stream)."""
    w = g.floats(f"{name}.weight", params[f"{name}.weight"])
    b = g.floats(f"{name}.bias", params[f"{name}.bias"])
    if delta is None:
        return g.op("LayerNormalization", [residual, w, b], f"{name}/LayerNormalization", axis=-1, epsilon=eps), residual
    normed, _, _, summed = g.op("SkipLayerNormalization", [delta, residual, w, b], f"{name}/SkipLayerNormalization",
                                outputs=[f"{name}/out", "", "", f"{name}/residual"], domain="com.microsoft",
                                epsilon=eps)
    return normed, summed
