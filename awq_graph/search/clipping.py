"""Per linear, after the folds: the clipping search of each (row, group)'s range, then its integers (to nearest, or GPTQ's on that grid)."""
from __future__ import annotations

import torch

from ..core.analysis import feeds_attention_scores
from ..core.ranks import ONE, Ranks
from ..core.numerics import (QuantScheme, QuantizedWeight, blockwise_error, fake_quantize, gptq_integers,
                              group_extrema, output_gain, quantize, rowwise_output_error)
from ..passes.fold import Folded
from .reports import ClipReport, RoundingReport


def clip_and_quantize(gm, linears, stats, folded: list[Folded], opts, ranks: Ranks = ONE, unclipped: bool = False):
    """The integers of every quantizable linear of the layer, after the folds: per linear a
    clipping search on its (now scaled) input statistics, then quantize (``opts.rounding``:
    to nearest, or GPTQ's error-compensating rounding on the same grid). Returns (integers,
    the integers at full range (``unclipped``; else None), the clipping reports, the rounding
    reports). Over several ranks the linears' clipping searches are shared out (linear i on
    rank i mod world), their outcomes sent to rank 0, which alone quantizes."""
    col_scale = {n: None for n in linears}  # the product of the scales folded into each linear's columns
    for f in folded:
        for layer in f.group.layers:
            if layer in col_scale:
                col = f.group.column_scale(f.scale, layer)
                col_scale[layer] = col if col_scale[layer] is None else col_scale[layer] * col
    quantized, full_range, clips, roundings = {}, ({} if unclipped else None), [], []
    for i, name in enumerate(linears):
        site = gm.linears[name]
        stat = stats[site.input]
        owner = i % ranks.world  # the rank that searches this linear's clipping
        mine = ranks.rank in (owner, 0)
        blocks = None
        if opts.clip and ranks.rank == owner:
            inv = None if col_scale[name] is None else 1.0 / col_scale[name].to(opts.device)  # the input is now x / s
            blocks = stat.blocks(stat.scaled(inv), opts.scheme.group_size)
        if not mine:
            ranks.object_from(owner, None)
            continue
        w = site.matrix(gm.params).detach().to(opts.device, torch.float32)
        shrink, report, gain = None, None, None
        if ranks.rank == owner:
            shrink, report = clip_search(name, w, blocks, stat.tokens * site.out_features, opts, site.node)
            gain = clip_gain(w, shrink, blocks, report, opts)
        shrink, report, gain = ranks.object_from(owner, (shrink, report, gain))
        if not ranks.leader:
            continue
        if report is not None:
            clips.append(report)
        qw = quantize(w, opts.scheme, shrink)
        qw = qw if gain is None else qw.with_gain(gain)
        grams = None if opts.rounding == "nearest" else hessians(
            stat.scaled(None if col_scale[name] is None else 1.0 / col_scale[name].to(opts.device)), stat.form)
        qw, rounding = compensated(name, w, qw, grams, opts)
        quantized[name] = qw.to("cpu")
        roundings += [rounding] if rounding is not None else []
        if unclipped:
            same = gain is None and (report is None or not report.clipped)
            full_range[name] = quantized[name] if same else \
                compensated(name, w, quantize(w, opts.scheme), grams, opts)[0].to("cpu")
        del grams
    return quantized, full_range, clips, roundings


def compensated(name: str, w: torch.Tensor, qw: QuantizedWeight, grams: list[torch.Tensor] | None, opts):
    """``qw``'s integers re-chosen by GPTQ's error-compensating rounding on its own grid (its
    scales and zero points kept), where ``opts.rounding`` asks for it; each row keeps the integers
    of lower output error on the calibration input, so no row gets worse than its rounding to
    nearest. ``grams``: H of the scaled input (``hessians``), one per expert of a bank, whose rows
    are the experts' one after the other. Returns (integers, ``RoundingReport`` or None)."""
    if opts.rounding == "nearest":
        return qw, None
    per = w.shape[0] // len(grams)
    parts, before, after, kept = [], 0.0, 0.0, 0
    for e, gram in enumerate(grams):
        rows = slice(e * per, (e + 1) * per)
        near = qw.take_rows(rows)
        q = gptq_integers(w[rows], near.scale, near.zero, opts.scheme, gram, opts.gptq_damp, opts.act_order)
        new = QuantizedWeight(q, near.scale, near.zero, opts.scheme)
        loss_near = rowwise_output_error(w[rows] - near.dequantize(), gram)
        loss_new = rowwise_output_error(w[rows] - new.dequantize(), gram)
        worse = loss_new > loss_near
        parts.append(QuantizedWeight(torch.where(worse[:, None], near.q, q), near.scale, near.zero, opts.scheme))
        before += float(loss_near.sum())
        after += float(torch.minimum(loss_near, loss_new).sum())
        kept += int(worse.sum())
    made = parts[0] if len(parts) == 1 else QuantizedWeight.concat_rows(parts)
    return made, RoundingReport(name, opts.rounding, before, after, kept)


def hessians(moment, form: str) -> list[torch.Tensor]:
    """H = X^T X (float32) of an input from its statistics in either form (``InputStats.scaled``);
    a bank's: one per expert."""
    if isinstance(moment, list) or (isinstance(moment, torch.Tensor) and form == "quadratic" and moment.dim() == 3):
        return [h for m in moment for h in hessians(m, form)]
    return [moment.T @ moment if form == "direct" else moment]


def clip_gain(w, shrink, blocks, report: ClipReport | None, opts) -> torch.Tensor | None:
    """Where the clipping shrank a range: the gain of each (row, group)'s scale
    (``numerics.output_gain``), computed by the rank that searched the clipping; else None."""
    if report is None or not report.clipped or opts.clip_gain == "off":
        return None
    return output_gain(quantize(w, opts.scheme, shrink), w, blocks, opts.clip_gain).cpu()


# rows of a weight the clipping search sweeps at once: its temporaries (a few of these blocks) stay
# in the CPU's caches, which is faster than a sweep of the whole weight, and the shrinks are the
# same (rows are independent)
CLIP_BLOCK_ELEMENTS = 1 << 21


def clip_search(name, w, blocks, numel, opts, node):
    """Per (row, group) range shrink minimizing dW_g H_gg dW_g^T (``blocks``: the H_gg).

    Three sweeps over r = 1, 0.95, ..., 1 - max_shrink: both ends together (AWQ's search),
    then, for an asymmetric scheme, the min end with the max end fixed, then the max end
    with the min end fixed; each (row, group) on its own, a block of ``CLIP_BLOCK_ELEMENTS``
    rows at a time (a bank of experts: each expert's rows against its own blocks). Returns
    (shrink, report); shrink is a pair (max, min) of (out, G).
    """
    scheme = opts.scheme
    if not opts.clip:
        return 1.0, None
    numel = max(numel, 1)
    if feeds_attention_scores(node):
        base = blockwise_error(fake_quantize(w, scheme).sub_(w), blocks)
        loss = float(base.sum()) / numel
        return 1.0, ClipReport(name, False, loss, loss, 1.0)
    steps = max(1, int(round(opts.max_shrink * opts.clip_grid)))
    ratios = [1.0 - k / opts.clip_grid for k in range(steps)]
    rows = max(1, CLIP_BLOCK_ELEMENTS // max(w.shape[1], 1))
    if rows >= w.shape[0]:  # the whole weight in one sweep (a bank: ``blockwise_error`` pairs experts and blocks)
        parts = [(w, blocks)]
    else:  # a block of rows at a time, within one expert's rows
        per_expert_blocks = list(blocks) if blocks.dim() == 4 else [blocks]
        per_expert = w.shape[0] // len(per_expert_blocks)
        parts = [(w[r:min(r + rows, (e + 1) * per_expert)], expert_blocks)
                 for e, expert_blocks in enumerate(per_expert_blocks)
                 for r in range(e * per_expert, (e + 1) * per_expert, rows)]
    his, los, before, after = [], [], 0.0, 0.0
    for part, part_blocks in parts:
        hi, lo, first, best = _clip_rows(part, part_blocks, scheme, ratios)
        his.append(hi)
        los.append(lo)
        before += float(first.sum())
        after += float(best.sum())
    hi, lo = torch.cat(his), torch.cat(los)
    return (hi, lo), ClipReport(name, True, before / numel, after / numel, float((hi.mean() + lo.mean()) / 2))


def _clip_rows(w, blocks, scheme: QuantScheme, ratios: list[float]):
    """``clip_search``'s sweeps over a block of rows: (hi, lo, the error at full range, the best
    error), each (rows, G)."""
    extrema = group_extrema(w, scheme)  # w is fixed: only the shrinks change

    def error(hi, lo):
        return blockwise_error(fake_quantize(w, scheme, (hi, lo), extrema).sub_(w), blocks)  # one block's temporary

    first = best_err = error(1.0, 1.0)  # (rows, G)
    hi = torch.ones_like(best_err)
    lo = torch.ones_like(best_err)
    sweeps = [("both", r) for r in ratios[1:]]
    if not scheme.symmetric:
        sweeps += [("min", r) for r in ratios] + [("max", r) for r in ratios]
    for which, r in sweeps:
        cand_hi = torch.full_like(hi, r) if which in ("both", "max") else hi
        cand_lo = torch.full_like(lo, r) if which in ("both", "min") else lo
        err = error(cand_hi, cand_lo)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        hi = torch.where(better, cand_hi, hi)
        lo = torch.where(better, cand_lo, lo)
    return hi, lo, first, best_err
