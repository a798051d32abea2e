"""The search's driver: decoder layer by decoder layer, the statistics, each group's scale, the folds, then clip and quantize."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
import torch

from ..core.analysis import quantizable_linears
from ..core.heap import heap_reused
from ..core.ir import GraphModel, in_module, run_nodes
from ..core.layer_cut import LayerCut, params_read
from ..core.ranks import ONE, Ranks
from ..core.numerics import QuantScheme
from ..core.progress import no_progress
from ..core.records import ScalingGroup
from ..guard import HeldAsideGuard
from ..passes.fold import Folded, fold_scales, folded_params
from .clipping import clip_and_quantize
from .grid import search_group
from .head import search_head
from .options import SearchOptions, loss_form
from .reports import ClipReport, GroupReport, RoundingReport, SearchResult
from .rounding import hold_integers
from .statistics import InputStats


def awq_search(gm: GraphModel, per_layer: list[list[ScalingGroup]], calib: torch.Tensor,
               opts: SearchOptions, progress=None, keep=None, head: tuple[ScalingGroup, QuantScheme] | None = None,
               ranks: Ranks = ONE, held: torch.Tensor | None = None) -> SearchResult:
    """Search, fold (in place on ``gm.params``; each fold's record in ``result.folded``) and
    quantize every decoder layer; then, given ``head`` (the group of the final norm and the head,
    and the head's scheme), the head on the final hidden states (``search_head``).

    ``calib``: (n_samples, seqlen) token ids. ``progress(iterable, desc, total)`` wraps loops.
    ``keep(name, packed)``: what to hold for a linear's packed integers (``IntegerSpill.put``
    writes them to disk as each layer finishes); None holds them in memory.
    ``ranks``: the processes sharing the calibration (``core.ranks``): each counts its share of the
    samples in the statistics; every rank runs the whole loss subsample, and the grid points of
    every group are shared out; rank 0 makes every choice and alone quantizes (the others'
    ``result.quantized`` stays empty).
    ``held``: (n, seqlen) token ids the search does not use, for the held-aside check
    (``awq_graph.guard``, by rank 0): per layer AWQ's integers, the unclipped ones or round-to-
    nearest's, and of the candidate models the one of least NLL on them (``result.guard``).
    """
    with heap_reused():  # the grid's large temporaries reuse the heap's pages (``core.heap``)
        return _awq_search(gm, per_layer, calib, opts, progress, keep, head, ranks, held)


def _awq_search(gm, per_layer, calib, opts, progress, keep, head, ranks, held=None) -> SearchResult:
    t0 = time.perf_counter()
    if opts.propagate == "quantized" and ranks.world > 1:
        raise ValueError("propagate='quantized' runs in one process (rank 0 alone holds the integers)")
    progress = progress or no_progress
    stages = LayerCut(gm)
    n_samples, seqlen = calib.shape
    # chunk 0 is the loss subsample: whole sequences, evenly spaced through the set
    n_loss = max(1, min(n_samples, opts.loss_tokens // seqlen))
    loss_idx = torch.linspace(0, n_samples - 1, n_loss).round().long().unique()
    rest = torch.tensor([i for i in range(n_samples) if i not in set(loss_idx.tolist())], dtype=torch.long)
    chunks = _plan_chunks(calib, loss_idx, rest, max(1, opts.chunk_tokens // seqlen), ranks)
    input_node = gm.input_node()
    params_env = params_read(gm, stages.stages[0], "cpu")
    stores: list[dict] = [{} for _ in chunks.ids]
    with torch.no_grad():
        for c, ids in enumerate(chunks.ids):  # pre stage (embeddings, rotary tables, masks), on the CPU
            env = {**params_env, input_node: ids}
            run_nodes(stages.stages[0], env)
            stores[c] = {n: _on(env[n], opts.device) for n in stages.keep_after[0]}
    del params_env, env
    chunks = replace(chunks, ids=[ids.to(opts.device) for ids in chunks.ids])

    quantizable = set(quantizable_linears(gm))
    result = SearchResult({})
    guard = HeldAsideGuard(gm, stages, held, opts.scheme, opts.device) if held is not None and ranks.leader else None
    fold_layer = []  # the decoder layer of each fold in result.folded
    for li in progress(range(stages.n), "AWQ search", stages.n):
        nodes = stages.stages[li + 1]
        groups = per_layer[li] if li < len(per_layer) else []
        base = f"{stages.prefix}.{li}"
        linears = [n for n in gm.linears if n.startswith(base + ".") and n in quantizable]
        layer = Layer(gm, li, nodes, groups, linears, chunks, stages, opts, ranks, n_samples * seqlen)
        with torch.no_grad(), (gm.params.hold() if gm.streamed else nullcontext()):
            made = _search_layer(layer, stores, keep, guard)
        result.groups += made.groups
        result.folded += made.folded
        result.quantized.update(made.quantized)
        result.clips += made.clips
        result.roundings += made.roundings
        fold_layer += [li] * len(made.folded)
        if gm.streamed:  # the layer leaves memory, but for what its folds edited outside its linears
            _release_layer(gm, nodes, linears, made.folded)
    if guard is not None:
        with torch.no_grad(), (gm.params.hold() if gm.streamed else nullcontext()):
            result.guard, result.quantized, undone = guard.finish()
        result.folded = [f for f, li in zip(result.folded, fold_layer) if li not in undone]
    if head is not None:
        search_head(gm, *head, chunks, stores, stages, opts, result, keep, ranks)
    result.seconds = time.perf_counter() - t0
    return result


@dataclass(frozen=True)
class Chunks:
    """The calibration samples as this rank runs them: ``ids[c]`` per interpreter pass; the first
    ``loss`` chunks are the loss subsample (every rank runs all of it: the grid points are shared
    out); ``counted[c]``: whether this rank adds chunk c to the statistics (each sample is counted
    by one rank)."""

    ids: list[torch.Tensor]
    counted: list[bool]
    loss: int

    @staticmethod
    def counted_once(ids: list[torch.Tensor]) -> "Chunks":
        """One process's chunks, each counted (the first the loss subsample): what ``search_head``
        takes outside ``awq_search`` (tools/bench_head.py)."""
        return Chunks(list(ids), [True] * len(ids), 1)


def _plan_chunks(calib, loss_idx, rest, per_chunk: int, ranks: Ranks) -> Chunks:
    mine = ranks.share(loss_idx)
    others = loss_idx[~torch.isin(loss_idx, mine)]
    ids, counted = [calib[mine]], [True]
    if len(others):  # the loss sequences another rank counts
        ids.append(calib[others])
        counted.append(False)
    loss = len(ids)
    rest = ranks.share(rest)
    for i in range(0, len(rest), per_chunk):
        ids.append(calib[rest[i:i + per_chunk]])
        counted.append(True)
    return Chunks(ids, counted, loss)


def _output_residual(stages: LayerCut, li: int):
    """The residual stream layer ``li`` hands on: of the tensors it makes that a later stage reads,
    the largest (the hidden states; rotary tables and masks are made before the layers)."""
    made = [n for n in stages.keep_after[li + 1] if stages.stage_of.get(n) == li + 1
            and isinstance(n.meta.get("val"), torch.Tensor)]
    return max(made, key=lambda n: n.meta["val"].numel(), default=None)


def _release_layer(gm: GraphModel, nodes, linears, folded: list[Folded]) -> None:
    quantized = {gm.linears[n].weight for n in linears}
    edited = {name for f in folded for name in f.params}
    read = {gm.param_of(a) for node in nodes for a in node.all_input_nodes} - {None}
    gm.params.release(quantized, spent=True)
    gm.params.release(read - quantized - edited)


def _on(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


@dataclass(frozen=True)
class Layer:
    """What one decoder layer's search reads: its nodes, scaling groups and quantizable linears,
    the calibration chunks, and how the search runs."""

    gm: GraphModel
    index: int
    nodes: list
    groups: list[ScalingGroup]
    linears: list[str]
    chunks: "Chunks"
    cut: LayerCut
    opts: SearchOptions
    ranks: Ranks
    tokens: int  # calibration tokens over every rank

    def form_of(self, channels: int, experts: int, out_features: int | None) -> str:
        return loss_form(self.tokens, channels, experts, self.opts.loss_form, out_features, self.opts.loss_points)


@dataclass
class LayerMade:
    """What one decoder layer's search made: per group its scale's report, the folds (what each
    changed), the integers as held, the clipping and rounding reports."""

    groups: list[GroupReport]
    folded: list[Folded]
    quantized: dict
    clips: list[ClipReport]
    roundings: list[RoundingReport]


def _search_layer(layer: Layer, stores: list[dict], keep=None, guard: HeldAsideGuard | None = None) -> LayerMade:
    """Decoder layer ``layer.index`` in three steps that return records: the scale of each group
    (``GroupReport``), the folds (``Folded``: what each changed), then clip + quantize. Hands the
    next layer's calibration input on through ``stores``."""
    gm, li, opts, ranks = layer.gm, layer.index, layer.opts, layer.ranks
    inputs = [dict(store) for store in stores] if opts.propagate == "quantized" else None
    stats, inspect, saved = _layer_statistics(gm, li, layer.nodes, layer.groups, layer.linears, layer.chunks, stores,
                                              layer.cut, layer.form_of, opts.device, ranks, opts.token_weight)
    reports, scales = [], []
    for g in layer.groups:
        s, report = search_group(gm, li, g, stats, inspect, saved, opts, set(layer.linears), ranks)
        reports.append(report)
        if s is not None:
            scales.append((g, s.cpu()))  # the folds edit the parameters where they live
    if guard is not None:  # what the layer was before its folds
        guard.snapshot(li, layer.linears, {p for g, _ in scales for p in folded_params(g, gm.linears)})
    folded = [fold_scales(gm.params, g, s, gm.linears) for g, s in scales]
    quantized, unclipped, clips, roundings = clip_and_quantize(gm, layer.linears, stats, folded, opts, ranks,
                                                               unclipped=guard is not None)
    if guard is not None:
        held = guard.layer(li, layer.nodes, quantized, unclipped, lambda name, qw: hold_integers(name, qw, keep))
    else:
        held = {name: hold_integers(name, qw, keep) for name, qw in quantized.items()}
    if inputs is not None:
        _advance_quantized(gm, li, layer.nodes, quantized, layer.chunks, inputs, stores, layer.cut, opts.device)
    return LayerMade(reports, folded, held, clips, roundings)


def _advance_quantized(gm, li, nodes, quantized, chunks, inputs, stores, stages, device) -> None:
    """The next layer's calibration input as the quantized model makes it: layer ``li`` (folded)
    run again on its inputs with each linear's weight replaced by its dequantized integers."""
    params = params_read(gm, nodes, device)
    for name, qw in quantized.items():
        site = gm.linears[name]
        params[site.weight_node] = site.stored(qw.to(device).dequantize()).to(params[site.weight_node].dtype)
    input_node = gm.input_node()
    for c, ids in enumerate(chunks.ids):
        env = {**params, **inputs[c], input_node: ids}
        run_nodes(nodes, env, device)
        stores[c] = {n: env[n] for n in stages.keep_after[li + 1]}
        del env


def _layer_statistics(gm, li, nodes, groups, linears, chunks, stores, stages, form_of, device="cpu", ranks=ONE,
                      token_weight: str = "none"):
    """Run layer ``li`` over every calibration chunk: the statistics of each linear input (in the
    form ``form_of(channels, experts, out_features)`` picks, ``out_features`` the rows of the
    single-linear loss that reads it, None for an input only the clipping reads) from the chunks
    this rank counts, and (the loss chunks) the inputs and outputs of each ``module2inspect`` that is not a single linear. Hands
    the chunks' values on to the next layer through ``stores``. The statistics are then those of
    every rank's tokens (``InputStats.reduce``, in the nodes' order: the same on every rank).
    ``token_weight`` "residual": each token weighted by 1 / the mean square of the layer's output
    residual there (``SearchOptions.token_weight``), in the statistics and the saved losses."""
    input_nodes = {gm.linears[n].input for n in linears}
    for g in groups:
        input_nodes.add(gm.linears[g.inp].input)
    banks = {gm.linears[n].input: gm.linears[n] for n in linears if gm.linears[n].experts}
    loss_rows = {gm.linears[g.layers[0]].input: gm.linears[g.layers[0]].out_features for g in groups
                 if g.inspects_one_linear}
    stats = {}
    for node in input_nodes:
        channels, experts = node.meta["val"].shape[-1], banks[node].experts if node in banks else 0
        stats[node] = InputStats(channels, experts, form_of(channels, experts, loss_rows.get(node)), device, ranks)
    inspect = {}
    for g in groups:
        if not g.inspects_one_linear and g.module2inspect not in inspect:
            sub = [n for n in nodes if in_module(n, g.module2inspect)]
            subset = set(sub)
            ext = {a for n in sub for a in n.all_input_nodes if a not in subset}
            outs = [n for n in sub if any(u not in subset for u in n.users)  # its tensors (not sizes)
                    and isinstance(n.meta.get("val"), torch.Tensor)]
            inspect[g.module2inspect] = (sub, ext, outs)
    saved = {name: [] for name in inspect}  # per loss chunk: the subgraph's inputs and outputs
    params_env = params_read(gm, nodes, device)
    input_node = gm.input_node()
    residual = _output_residual(stages, li) if token_weight == "residual" else None
    for c, ids in enumerate(chunks.ids):
        env = {**params_env, **stores[c], input_node: ids}
        run_nodes(nodes, env, device)
        weight = None if residual is None else 1.0 / env[residual].float().pow(2).mean(-1).clamp(min=1e-12)
        if chunks.counted[c]:
            for node, st in stats.items():
                st.add(env[node], env[banks[node].node.args[2]] if node in banks else None, weight)
        if c < chunks.loss:
            for name, (sub, ext, outs) in inspect.items():
                saved[name].append(({a: env[a] for a in ext}, [env[o].clone() for o in outs], weight))
        stores[c] = {n: env[n] for n in stages.keep_after[li + 1]}
        del env
    for node in sorted(stats, key=lambda n: n.name):
        stats[node].reduce()
    return stats, inspect, saved
