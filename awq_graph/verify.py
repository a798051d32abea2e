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
from .passes.fold import fold_scales, folded_params


@dataclass(frozen=True)
class Verification:
    deviation: float  # max |after - before| / max |before| of the logits
    changed_params: int  # parameters whose values the folds changed


@torch.no_grad()
def verify_groups(gm: GraphModel, per_layer, seed: int = 0, batch: int = 2, seqlen: int = 24) -> Verification:
    """The parameters are not edited: the folded ones are made while the program runs, the
    parameters a set of groups shares together (one decoder layer's, in practice), and each
    dropped after its last reader, so about one layer's folded copies are in memory at a time (and,
    while they are folded, the parameters they are compared with: each is read once)."""
    gen = torch.Generator().manual_seed(seed)
    seqlen = gm.fixed_seq or seqlen
    size = int(gm.param_shape(token_table(gm))[0])
    ids = torch.randint(0, size, (batch, seqlen), generator=gen)
    before = gm.run(ids)
    folds = []
    for groups in per_layer:
        for g in groups:
            s = torch.ones(g.channels)
            used = torch.tensor(g.used_channels())
            s[used] = torch.exp(torch.empty(len(used)).uniform_(-math.log(8), math.log(8), generator=gen))
            folds.append((g, s))
    makers, changed = _folded_makers(gm, folds)
    after = gm.run(ids, made=makers)
    return Verification(float((after - before).abs().max() / before.abs().max().clamp(min=1e-12)), len(changed))


def _folded_makers(gm: GraphModel, folds) -> tuple[dict, set]:
    """Parameter name -> a function making its folded copy. Groups that share a parameter are
    folded together (in their order) when the first of their parameters is read. The returned
    set fills, as the copies are made, with the names whose values the folds changed."""
    parent: dict[str, str] = {}

    def root(name):
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    for g, _ in folds:
        names = folded_params(g, gm.linears)
        first = root(names[0])
        for name in names[1:]:
            parent[root(name)] = first
    members: dict[str, list[str]] = {}
    for name in parent:
        members.setdefault(root(name), []).append(name)
    folds_of: dict[str, list] = {}  # a set's folds, in their order
    for g, s in folds:
        folds_of.setdefault(root(folded_params(g, gm.linears)[0]), []).append((g, s))
    made: dict[str, dict] = {}
    changed: set[str] = set()

    def make(name):
        key = root(name)
        if key not in made:
            # each parameter read once (a streamed one from the checkpoint): the copies are
            # compared with it as soon as folded, then it is dropped
            original = {n: gm.params[n] for n in members[key]}
            local = {n: t.clone() for n, t in original.items()}
            for g, s in folds_of[key]:
                fold_scales(local, g, s, gm.linears)
            changed.update(n for n, t in local.items() if not torch.equal(t, original[n]))
            del original
            made[key] = local
        value = made[key].pop(name)
        if not made[key]:
            del made[key]
        return value

    return {name: (lambda name=name: make(name)) for name in parent}, changed
