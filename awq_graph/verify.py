"""Soundness check of scaling groups: fold random positive scales, compare logits.

For every group, s ~ exp(U(-ln 8, ln 8)) per source channel (log-uniform over 1/8..8) is
folded with quantization off; an exact group leaves the logits unchanged. Returns the
largest relative deviation max|after - before| / max|before| over random token batches, and
how many parameters the folds changed (a fold that changes nothing proves nothing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .core.analysis import token_table
from .core.ir import GraphModel
from .passes.fold import fold_scales


@dataclass(frozen=True)
class Verification:
    deviation: float  # max |after - before| / max |before| of the logits
    changed_params: int  # parameters whose values the folds changed


@torch.no_grad()
def verify_groups(gm: GraphModel, per_layer, seed: int = 0, batch: int = 2, seqlen: int = 24) -> Verification:
    gen = torch.Generator().manual_seed(seed)
    size = int(gm.params[token_table(gm)].shape[0])
    ids = torch.randint(0, size, (batch, seqlen), generator=gen)
    before = gm.run(ids)
    saved = {k: v.clone() for k, v in gm.params.items()}
    try:
        for groups in per_layer:
            for g in groups:
                s = torch.ones(g.channels)
                used = torch.tensor(g.used_channels())
                s[used] = torch.exp(torch.empty(len(used)).uniform_(-math.log(8), math.log(8), generator=gen))
                fold_scales(gm.params, g, s, gm.linears)
        after = gm.run(ids)
        changed = sum(not torch.equal(gm.params[k], v) for k, v in saved.items())
    finally:
        for k, v in saved.items():
            gm.params[k].copy_(v)
    return Verification(float((after - before).abs().max() / before.abs().max().clamp(min=1e-12)), changed)
