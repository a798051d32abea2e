"""A scaling group's scale: AWQ's grid over the ratio, each point's loss on the group's module2inspect (or its one linear), screened where cheap."""
from __future__ import annotations

import torch

from ..core.ir import run_nodes
from ..core.ranks import ONE, Ranks
from ..core.numerics import awq_candidate_scales, scaled_fake_quantize, weight_magnitude
from ..core.records import ScalingGroup
from .options import SCREEN_MARGIN
from .reports import GroupReport
from .statistics import Moments, scatter_mean


def search_group(gm, li, g: ScalingGroup, stats, inspect, saved, opts, quantized: set[str], ranks: Ranks = ONE,
                 row_block: int | None = None):
    """The best scale for group ``g`` (None: the identity); only the layers in ``quantized``
    are rounded in the loss (an MoE router in the group is scaled but stays float). A group of
    one linear may have its loss taken ``row_block`` rows at a time (the head: an 8B model's is
    128256 x 4096), so the temporaries stay a few blocks."""
    scheme, device = opts.scheme, opts.device
    inp_stat = stats[gm.linears[g.inp].input]
    inp_map = torch.tensor(g.channel_map(g.inp), device=device)
    x_mean = scatter_mean(inp_stat.x_mean, inp_map, g.channels)
    weights = {name: gm.linears[name].matrix(gm.params).detach().to(device, torch.float32)
               for name in g.layers if name in quantized}
    if not weights:
        return None, GroupReport(li, g.prev_op, list(g.layers), None, 0.0, 0.0)
    maps = {name: torch.tensor(g.channel_map(name), device=device) for name in g.layers}
    parts = {n: w.split(row_block) if row_block else (w,) for n, w in weights.items()}
    rows = sum(w.shape[0] for w in weights.values())
    w_mean = sum(scatter_mean(weight_magnitude(p, scheme.group_size), maps[n], g.channels) * p.shape[0]
                 for n, ps in parts.items() for p in ps) / rows

    if g.inspects_one_linear:
        name = g.layers[0]
        stat = stats[gm.linears[name].input]
        moments, form = Moments(stat, opts.linear_screen), stat.form
        numel = stat.tokens * gm.linears[name].out_features
        screen = moments.screen

        def loss_of(s, screened=None):
            sc = g.column_scale(s, name)
            return sum(float(moments.error(scaled_fake_quantize(p, sc, scheme).sub_(p), screened))
                       for p in parts[name]) / numel
    else:
        form = "forward"
        sub, ext, outs = inspect[g.module2inspect]
        loss_chunks = saved[g.module2inspect]  # the loss subsample, in one or two chunks
        placeholders = {name: gm.linears[name].weight_node for name in weights}
        numel = sum(r.numel() for _, refs, _ in loss_chunks for r in refs)
        dtype = opts.screen_dtype
        screen = None if dtype is None else opts.linear_screen  # "bfloat16": a subgraph has no sketch
        swaps = [delta_products(sub, ext_values, device, dtype) for ext_values, _, _ in loss_chunks] if dtype else None

        def loss_of(s, screened=None):
            quantized = {}
            for name, w in weights.items():
                sc = g.column_scale(s, name)
                quantized[placeholders[name]] = gm.linears[name].stored(scaled_fake_quantize(w, sc, scheme))
            total = 0.0
            for k, (ext_values, refs, weight) in enumerate(loss_chunks):
                env = {**ext_values, **quantized}
                run_nodes(sub, env, device, swap=swaps[k] if screened is not None else None)
                total += sum(float(token_weighted((env[o].float() - r.float()) ** 2, weight)) for o, r in zip(outs, refs))
            return total / numel

    best_s, best_ratio, outcome = grid_search(loss_of, x_mean, w_mean, g, opts.n_grid, device, ranks, screen)
    return best_s, GroupReport(li, g.prev_op, list(g.layers), best_ratio, loss_form=form, **outcome)


def token_weighted(squared: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The sum of ``squared`` errors, each token's times its weight (``SearchOptions.token_weight``)
    where the error has the weight's leading shape; else unweighted."""
    if weight is None or squared.dim() < 1 or squared.shape[:-1] != weight.shape:
        return squared.sum()
    return (squared.sum(-1) * weight).sum()


def delta_products(sub, ext_values: dict, device, dtype: torch.dtype) -> dict:
    """The screen of a subgraph's loss on one loss chunk, as ``swap`` of ``run_nodes``: every
    linear ``aten.linear(x, W, b)`` of the subgraph returns its float run's output plus the change,
    (x - x0) W0^T + x (W - W0)^T, each product in ``dtype``: its rounding is then relative to the
    change the loss measures, not to the output (a subgraph run wholly in bfloat16 deviated from
    float32 by up to 1% of the loss on SmolLM2's attention). The float run is made here, once."""
    env = run_nodes(sub, dict(ext_values), device)

    def product(x0, w0, out0):
        w0_low = w0.to(dtype)

        def call(x, w, bias=None):
            out = out0
            if x is not x0:
                out = out + ((x - x0).to(dtype) @ w0_low.T).to(out0.dtype)
            if w is not w0:
                out = out + (x.to(dtype) @ (w - w0).to(dtype).T).to(out0.dtype)
            return out
        return call

    return {n: product(env[n.args[0]], env[n.args[1]], env[n])
            for n in sub if n.target is torch.ops.aten.linear.default}


def grid_search(loss_of, x_mean, w_mean, g: ScalingGroup, n_grid: int, device, ranks: Ranks = ONE,
                screen=None):
    """AWQ's grid over the ratio, the identity included: (best scale or None, its ratio, the
    report's fields: the identity's loss, the best loss, how many points got a float32 loss, the
    screen's largest deviation seen, the passes over points, the screen). ``loss_of(s, screen)`` is
    the loss of scale ``s``: in float32 (``screen`` None), or its cheaper estimate (``screen``: the
    name of the loss's screen, "bfloat16", "bfloat16 sketch" or "sketch").

    With a ``screen`` every point is first screened with it; the identity, the screen's best
    ratio and its two neighbours, and the points within ``SCREEN_MARGIN`` of the best screened loss
    then get their float32 loss, and the best of those is chosen. The screen's error is measured
    on them (float32 loss minus screened loss, less the mean of that difference); while it is
    above a quarter of the margin, the margin widens to four times it and the points newly within get their float32 loss (at worst every
    point). The choice is float32's whenever no point left unevaluated erred by more than half the
    final margin. Over several ranks each computes every world-th point of each pass, and every
    decision is made from rank 0's copy of the losses."""
    ones = torch.ones(g.channels, device=device)
    used = torch.tensor(g.used_channels(), device=device)
    candidates: list[tuple[float | None, torch.Tensor | None]] = [(None, ones)]
    for k in range(n_grid):
        s = ones.clone()
        s[used] = awq_candidate_scales(x_mean[used], w_mean[used], k / n_grid)
        candidates.append((k / n_grid, s if bool(torch.isfinite(s).all()) else None))
    finite = [i for i, (_, s) in enumerate(candidates) if s is not None]

    passes = 0

    def losses(points, screened):  # one pass: these points' losses, shared out over the ranks
        nonlocal passes
        values = torch.zeros(len(candidates), dtype=torch.float64)
        if not points:
            return values
        passes += 1
        for j, i in enumerate(points):
            if j % ranks.world == ranks.rank:
                values[i] = loss_of(candidates[i][1], screened)
        return ranks.agreed_sum(values)

    deviation = None
    if screen is None:
        exact, points = losses(finite, None), finite
    else:
        screened = losses(finite, screen)
        top = min(finite[1:], key=lambda i: float(screened[i]), default=0)  # the screen's best ratio
        low = min(float(screened[i]) for i in finite)
        margin, points = SCREEN_MARGIN * abs(low), []
        exact = torch.zeros_like(screened)
        first = {0, top - 1, top, top + 1} if top else {0}  # its neighbours too: where a slight error moves it
        while True:
            near = [i for i in finite if i not in points and (i in first or screened[i] <= low + margin)]
            exact = exact + losses(near, None)
            points = sorted(points + near)
            diff = (screened - exact)[points]
            deviation = float((diff - diff.mean()).abs().max())
            if 4 * deviation <= margin or len(points) == len(finite):
                break
            margin = 4 * deviation  # the screen erred more than the margin allows: widen it to what was seen
        deviation = deviation / max(abs(low), 1e-30)
    best = 0
    for i in points[1:]:  # the first strictly lower loss: the identity wins ties
        if exact[i] < exact[best]:
            best = i
    ratio, s = candidates[best]
    return (None if best == 0 else s), ratio, {"loss_rtn": float(exact[0]), "loss_awq": float(exact[best]),
                                               "exact_points": len(points), "screen_deviation": deviation,
                                               "grid_passes": passes,
                                               "screen": screen}
