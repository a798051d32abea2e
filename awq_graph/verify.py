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
from .core.ir import GraphModel, Steps, run_nodes
from .passes.fold import fold_scales, folded_params


@dataclass(frozen=True)
class Verification:
    deviation: float  # max |after - before| / max |before| of the logits
    changed_params: int  # parameters whose values the folds changed


@torch.no_grad()
def verify_groups(gm: GraphModel, per_layer, seed: int = 0, batch: int = 2, seqlen: int = 24,
                  progress=None) -> Verification:
    """The parameters are not edited: the program runs twice in step, node by node, once on the
    parameters and once on their folded copies, so that each parameter is read once (a streamed
    one from the checkpoint: an 8B model's pass from disk takes ~40 s). The folded copies of a set
    of parameters the groups share (one decoder layer's, in practice) are made when the set is
    first read, and each, like its original, is dropped after its last reader: about one layer's
    parameters twice over are in memory at a time. ``progress``: a bar over the parameters read."""
    gen = torch.Generator().manual_seed(seed)
    seqlen = gm.fixed_seq or seqlen
    size = int(gm.param_shape(token_table(gm))[0])
    ids = torch.randint(0, size, (batch, seqlen), generator=gen)
    folds = []
    for groups in per_layer:
        for g in groups:
            s = torch.ones(g.channels)
            used = torch.tensor(g.used_channels())
            s[used] = torch.exp(torch.empty(len(used)).uniform_(-math.log(8), math.log(8), generator=gen))
            folds.append((g, s))
    take, changed = _folded_sets(gm, folds)
    with Steps(progress, "verifying the groups", len(gm.placeholder_param)) as steps:
        before, after = _run_twice(gm, ids, steps.after(take))
    return Verification(float((after - before).abs().max() / before.abs().max().clamp(min=1e-12)), len(changed))


def _run_twice(gm: GraphModel, ids: torch.Tensor, take) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits on the parameters and on the folded ones (``take(name)``: (the parameter, its
    folded copy)), the two programs evaluated in step (``run_nodes`` one node at a time), each
    value dropped after its last reader."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    last_reader = {a: n for n in nodes for a in n.all_input_nodes}
    plain, folded = {gm.input_node(): ids}, {gm.input_node(): ids}
    for node in nodes:
        for a in node.all_input_nodes:
            name = gm.param_of(a)
            if name is not None and a not in plain:
                plain[a], folded[a] = take(name)
        run_nodes([node], plain)
        run_nodes([node], folded)
        for a in node.all_input_nodes:
            if last_reader[a] is node and a is not out:
                plain.pop(a, None)
                folded.pop(a, None)
    return plain[out], folded[out]


def _folded_sets(gm: GraphModel, folds):
    """``take(name)`` -> (the parameter, its folded copy; the parameter itself where no group
    folds into it), and the set that fills with the names whose values the folds changed. Groups
    that share a parameter are folded together (in their order): on the first ``take`` of one of
    their parameters, each of the set's is read once, copied and folded, and both are held until
    taken."""
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
    held: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    changed: set[str] = set()

    def take(name):
        if name not in parent:
            value = gm.params[name]
            return value, value
        if name not in held:
            original = {n: gm.params[n] for n in members[root(name)]}
            local = {n: t.clone() for n, t in original.items()}
            for g, s in folds_of[root(name)]:
                fold_scales(local, g, s, gm.linears)
            changed.update(n for n, t in local.items() if not torch.equal(t, original[n]))
            held.update((n, (original[n], local[n])) for n in original)
        return held.pop(name)

    return take, changed
