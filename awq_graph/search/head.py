"""The head as one more single-linear group, searched on the final hidden states."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
import torch

from ..core.analysis import ancestors
from ..core.ir import GraphModel, run_nodes
from ..core.layer_cut import LayerCut, params_read
from ..core.ranks import ONE, Ranks
from ..core.numerics import QuantScheme, QuantizedWeight, quantize
from ..core.records import ScalingGroup
from ..passes.fold import Folded, fold_scales
from .clipping import clip_gain, clip_search, compensated, hessians
from .grid import search_group
from .options import SearchOptions, loss_form
from .reports import ClipReport, RoundingReport, SearchResult
from .rounding import hold_integers
from .statistics import InputStats


HEAD_ROWS = 8192  # rows of the head per pass: the search's temporaries stay a few (rows x in) floats


def head_input_nodes(stages: LayerCut, head_input) -> list:
    """The post stage's nodes that ``head_input`` (the head's input node) depends on, in graph
    order: what computes the final hidden states, normed, and not the (tokens x vocab) logits."""
    post = stages.stages[stages.n + 1]
    needed = ancestors(head_input, within=set(post))
    return [n for n in post if n in needed]


def search_head(gm: GraphModel, group: ScalingGroup, scheme: QuantScheme, chunks, stores, stages: LayerCut,
                opts: SearchOptions, result: SearchResult, keep=None, ranks: Ranks = ONE) -> None:
    """The head as one more single-linear group (``group``: the final norm -> the head): the
    statistics of its input over every calibration token (the final hidden states, normed: the
    post stage run only up to the head's input, never the (tokens x vocab) logits), the scale
    grid and the clipping search in ``scheme`` (its own bits and group size), then its integers
    into ``result``. The scale is folded into the norm only: the head's scaled matrix is a copy,
    since a tied head's matrix is also the token table, which keeps its own values. The head is
    worked on ``HEAD_ROWS`` rows at a time (an 8B model's is 128256 x 4096)."""
    (name,) = group.layers
    site = gm.linears[name]
    nodes = head_input_nodes(stages, site.input)
    head_opts = SearchOptions(**{**opts.__dict__, "scheme": scheme})
    tokens = int(ranks.total(sum(int(ids.numel()) for ids, n in zip(chunks.ids, chunks.counted) if n)))
    stat = InputStats(group.channels, 0, loss_form(tokens, group.channels, 0, opts.loss_form, site.out_features,
                                               opts.loss_points), opts.device, ranks)
    input_node = gm.input_node()
    with torch.no_grad(), (gm.params.hold() if gm.streamed else nullcontext()):  # the norm stays resident
        params_env = params_read(gm, nodes, opts.device)
        for c, ids in enumerate(chunks.ids):
            if not chunks.counted[c]:
                continue
            env = {**params_env, **stores[c], input_node: ids}
            run_nodes(nodes, env, opts.device)
            stat.add(env[site.input])
            del env
        del params_env
    stat.reduce()
    with torch.no_grad():
        s, report = search_group(gm, stages.n, group, {site.input: stat}, None, None, head_opts, {name}, ranks,
                                 row_block=HEAD_ROWS)
        result.groups.append(report)
        w = site.matrix(gm.params).detach().to(opts.device, torch.float32)  # a tied head's: the table, read afresh
        parts, numel = list(w.split(HEAD_ROWS)), stat.tokens * site.out_features
        col = None
        if s is not None:
            fold_scales(gm.params, replace(group, layers=(), channel_maps=()), s.cpu(), gm.linears)  # the norm only
            result.folded.append(Folded(group, s.cpu(), tuple(group.prev_params)))
            col = group.column_scale(s, name)
        if not ranks.leader:  # rank 0 alone clips and quantizes the head
            return
        moment = stat.scaled(None if col is None else 1.0 / col)
        blocks = stat.blocks(moment, scheme.group_size) if opts.clip else None
        grams = None if opts.rounding == "nearest" else hessians(moment, stat.form)  # once for every row block
        pieces, clips, roundings = [], [], []
        for p in parts:
            p = p if col is None else p * col  # the scaled rows, a block at a time
            shrink, clip = clip_search(name, p, blocks, numel, head_opts, site.node)
            gain = clip_gain(p, shrink, blocks, clip, head_opts)
            qw = quantize(p, scheme, shrink)
            qw, rounding = compensated(name, p, qw if gain is None else qw.with_gain(gain), grams, head_opts)
            pieces.append(qw.to("cpu"))
            clips.append(clip)
            roundings.append(rounding)
        del moment, grams
        if clips[0] is not None:  # the sums over the row blocks: one report
            rows = [p.shape[0] for p in parts]
            result.clips.append(ClipReport(name, True, sum(c.loss_before for c in clips), sum(c.loss_after for c in clips),
                                           sum(c.mean_shrink * r for c, r in zip(clips, rows)) / sum(rows)))
        if roundings[0] is not None:
            result.roundings.append(RoundingReport(name, opts.rounding, sum(r.loss_nearest for r in roundings),
                                                   sum(r.loss_after for r in roundings),
                                                   sum(r.rows_kept_nearest for r in roundings)))
        result.quantized[name] = hold_integers(name, QuantizedWeight.concat_rows(pieces), keep)
