"""Fold: move a positive per-channel scale along a scaling group, in place on the weights.

For group g with source channels s (length C) and channel maps map_i:
  Case A  norm weight      w [, b]     -> w / s [, b / s]
  Case B  norm (1 + w)     w [, b]     -> (1 + w) / s - 1 [, b / s]
  Case C  layer_norm       w, b        -> w / s, b / s
  Case D  linear rows      W[j, :], b_j -> W[j, :] / s_j, b_j / s_j
  layers  W_i[:, c]        -> W_i[:, c] * s[map_i[c]]
The float function is unchanged (exact up to float rounding): the invariant the tests check.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from awq_graph.core.records import FoldKind, ScalingGroup


@dataclass(frozen=True)
class Folded:
    """What one fold changed: the group, its scale per source channel, and every parameter it
    edited (the source's, then the layers' weights)."""

    group: ScalingGroup
    scale: torch.Tensor  # (channels,)
    params: tuple[str, ...]


def folded_params(group: ScalingGroup, sites: dict) -> tuple[str, ...]:
    """The parameters a fold along ``group`` edits: its source's, then each layer's weight."""
    return tuple(group.prev_params) + tuple(sites[layer].weight for layer in group.layers)


@torch.no_grad()
def fold_scales(params: dict[str, torch.Tensor], group: ScalingGroup, s: torch.Tensor, sites: dict) -> Folded:
    """Fold ``s`` along ``group`` in place on ``params``; ``sites`` maps each layer to its
    ``LinearSite``. Returns what changed."""
    s = s.to(torch.float32)
    assert s.shape == (group.channels,) and bool((s > 0).all()), "scales must be positive, one per source channel"
    kind = group.prev_kind
    if kind is FoldKind.NORM_OFFSET:  # Case B: the weight is 1 + w; a bias is divided
        w = params[group.prev_params[0]]
        w.copy_(((1 + w.float()) / s - 1).to(w.dtype))
        for name in group.prev_params[1:]:
            _in_float32(params[name], torch.div, s)
    elif kind is FoldKind.LINEAR_T:  # Case D for a Conv1D weight stored (in, out): its columns are the rows
        for name in group.prev_params:
            _in_float32(params[name], torch.div, s)
    else:  # Cases A, C, D: every source parameter is divided along its output dim
        for name in group.prev_params:
            p = params[name]
            shape = (1, -1, 1) if p.dim() == 3 else (-1,) + (1,) * (p.dim() - 1)  # 3-D: a bank of experts
            _in_float32(p, torch.div, s.reshape(shape))
    for layer in group.layers:
        w = sites[layer].matrix(params)  # (out, in) view; (E * out, in) for experts
        _in_float32(w, torch.mul, group.column_scale(s, layer))
    return Folded(group, s, folded_params(group, sites))


def _in_float32(p: torch.Tensor, op, s: torch.Tensor) -> None:
    """``p = op(p, s)`` computed in float32 and stored in p's dtype: a float32 parameter in place
    (a weight-sized temporary, its pages faulted in afresh each time, was most of the fold
    verification's time)"""
    if p.dtype == torch.float32:
        op(p, s, out=p)
    else:
        p.copy_(op(p.float(), s).to(p.dtype))
