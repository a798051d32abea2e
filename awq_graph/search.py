"""The AWQ search, decoder layer by decoder layer, over the exported graph.

For group g with layers W_i (channel maps m_i), calibration input X of ``inp`` and
candidate scales s(a) = x_mean^a / w_mean^(1-a) (a = 0, 1/20, ..., 19/20) plus s = 1:

    L(s) = || f(X; Q(W_i diag(s[m_i])) diag(s[m_i])^-1) - f(X; W_i) ||^2 / numel

where f is the ``module2inspect`` subgraph run by the interpreter. When f is the single
linear of the group, L(s) = ||X dW^T||^2 / numel over every calibration token, in whichever of
two equal forms costs less (the loss cost model, ``loss_form``): the quadratic form
tr(dW H dW^T) with H = X^T X accumulated once (tokens x in^2, then out x in^2 per grid point,
in^2 float64 held), or the direct form from the rows X themselves (out x in x tokens per grid
point, tokens x in floats held, only while that is less than H). Otherwise f
runs on a fixed subsample of whole sequences (``loss_tokens``); the statistics (x_mean, and
H or X) always use every token.

The grid is screened where bfloat16 products are fast (``SearchOptions.screen``): every grid
point's loss is first computed with its large products in bfloat16 (3.8x float32's speed on an
AVX512-BF16 CPU), then in float32 for the identity, the screen's best ratio and its neighbours,
and the points within ``SCREEN_MARGIN`` of the best screened loss, and the choice is made from the
float32 losses alone. The screen's own error (its deviations from those float32 losses, less their
common offset) must be under a quarter of the margin, or the margin widens (``grid_search``). The
screen reads rows, X or the Cholesky factor of H (a random sketch of them where they are many);
a subgraph's linears add their change to their float outputs (``_delta_products``).

Then per linear, a clipping search: each group's range [min, max] shrinks by r in
1, 0.95, ..., 0.55 (asymmetric: both ends toward 0), r chosen per (row, group) by
dW_g H_gg dW_g^T on the scaled input. Linears whose output becomes attention scores
(q/k: they feed softmax through RoPE) keep their full range, as in AWQ.

A bank of MoE experts (E, out, in) is searched as its (E * out, in) rows, with one H per
expert from the rows routed to it; routers stay float.

The next layer's calibration input is this layer's float output; folding leaves the float
function unchanged, so the capture pass already computed it.

Over several processes (``core.ranks``), each counts its share of the samples in the statistics,
which are then summed (the direct form's rows gathered); every rank runs the whole loss subsample,
so every loss is the same on every rank, and the grid points and the clipping searches are shared
out; the choices are rank 0's, and rank 0 alone quantizes.
"""
from __future__ import annotations

import functools
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .core.analysis import ancestors, feeds_attention_scores, quantizable_linears
from .core.heap import heap_reused
from .core.ir import GraphModel, in_module, run_nodes
from .core.stages import Stages, params_read
from .core.ranks import ONE, Ranks
from .core.numerics import (PackedWeight, QuantScheme, QuantizedWeight, awq_candidate_scales, blockwise_error, diagonal_blocks,
                            diagonal_blocks_of_rows, direct_output_error, fake_quantize, gaussian_sketch, group_extrema,
                            output_gain, quadratic_output_error, quantize, scaled_fake_quantize,
                            weight_magnitude)
from .core.records import ScalingGroup
from .guard import GuardReport, HeldAsideGuard
from .passes.fold import Folded, fold_scales, folded_params


@dataclass(frozen=True)
class SearchOptions:
    scheme: QuantScheme = QuantScheme()
    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    # a clipped linear's groups rescaled so their outputs keep the float outputs' size
    # (``numerics.output_gain``): "lsq" (the least-squares gain: on SmolLM2 it did better
    # than "unbiased", docs/quality-on-a-1.5b-model.md), "unbiased", or "off"
    clip_gain: str = "lsq"
    # whole sequences for a non-linear module2inspect; on SmolLM2 g128, 4096 tokens gave no better
    # perplexity (24.90 vs 24.81 with 1024) at 1.3x the search time
    loss_tokens: int = 1024
    chunk_tokens: int = 4096  # tokens per interpreter pass
    # the single-linear loss: "auto" (direct when there are fewer tokens than input channels),
    # or one form forced ("quadratic", "direct"); both give the same loss
    loss_form: str = "auto"
    # where the calibration forward, the statistics, the grid and the clipping run; each
    # layer's weights go there only while it is searched, and the integers come back to the CPU
    device: str = "cpu"
    # the grid's screen: every grid point's loss estimated cheaply first, then in float32 for the
    # best few; the choice is float32's (see ``grid_search``). "bfloat16": the large products in
    # bfloat16 (single linears, their rows sketched where many, and subgraphs); "sketch": a single
    # linear's loss from a random sketch of its rows (float32, an eighth of them); "auto": bfloat16
    # where its products are fast, else the sketch; "off": float32 throughout
    screen: str = "auto"

    def __post_init__(self):
        if self.n_grid < 1 or self.clip_grid < 1 or not 0 <= self.max_shrink < 1:
            raise ValueError("n_grid and clip_grid must be >= 1 and 0 <= max_shrink < 1")
        if self.loss_form not in LOSS_FORMS:
            raise ValueError(f"loss_form must be one of {LOSS_FORMS}, got {self.loss_form!r}")
        if self.screen not in SCREENS:
            raise ValueError(f"screen must be one of {SCREENS}, got {self.screen!r}")
        if self.clip_gain not in ("unbiased", "lsq", "off"):
            raise ValueError(f"clip_gain must be 'unbiased', 'lsq' or 'off', got {self.clip_gain!r}")

    @property
    def loss_points(self) -> float:
        """The grid's points in float32 equivalents, for the loss cost model (``loss_form``): each
        point once in float32, or, screened, each in bfloat16 (about a quarter of float32's time
        on a CPU with AVX512-BF16) or sketched (an eighth of its rows), and about four in float32."""
        kind = self.linear_screen
        return self.n_grid + 1 if kind is None else (self.n_grid + 1) / (4 if kind == "bfloat16" else SKETCH_RATIO) + 4

    @property
    def screen_dtype(self) -> torch.dtype | None:
        """The dtype of the grid's screen of a subgraph's loss, or None (float32 throughout)."""
        return torch.bfloat16 if self.linear_screen == "bfloat16" else None

    @property
    def linear_screen(self) -> str | None:
        """The screen of a single linear's loss: "bfloat16", "sketch" or None (float32 throughout)."""
        if self.screen == "off":
            return None
        if self.screen == "bfloat16" or (self.screen == "auto" and fast_bfloat16(self.device)):
            return "bfloat16"
        return "sketch"


LOSS_FORMS = ("auto", "quadratic", "direct")
SCREENS = ("auto", "bfloat16", "sketch", "off")
# the sketch screen's rows: a single linear's rows R (X, or the factor of H) become S R with
# S a (rows / SKETCH_RATIO, rows) Gaussian matrix scaled so that ||S R dW^T||^2 estimates
# ||R dW^T||^2; rows fewer than SKETCH_RATIO x SKETCH_MIN_ROWS are not sketched (no screen)
SKETCH_RATIO = 8
SKETCH_MIN_ROWS = 256
# a grid point whose screened loss is within this fraction of the best screened loss gets its
# float32 loss (more when the screen's error seen on those is over a quarter of it: ``grid_search``)
SCREEN_MARGIN = 0.002


@functools.cache
def fast_bfloat16(device: str) -> bool:
    """Whether bfloat16 matrix products run faster than float32's on ``device``: a CUDA GPU with
    bfloat16, a CPU with AVX512-BF16 or AMX (elsewhere torch emulates them, slower than float32)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def loss_form(tokens: int, channels: int, experts: int, asked: str = "auto", out_features: int | None = None,
              points: float = 21.0) -> str:
    """The cheaper exact form of the statistics of a linear input with ``channels`` channels over
    ``tokens`` calibration tokens: "quadratic" (H = X^T X, float64) or "direct" (the rows X, float32).

    Counted in multiply-adds: the quadratic form accumulates H once (tokens x in^2), then costs
    out x in^2 per grid point of a single-linear loss that reads it (``out_features``: that linear's
    rows); the direct form accumulates nothing and costs out x in x tokens per point. ``points``: the
    grid's points in float32 equivalents (``SearchOptions.loss_points``). An input only the clipping
    search reads (``out_features`` None) needs just H's diagonal blocks, which the rows give for
    tokens x in x group: the direct form is the cheaper there at any length. Either way the rows are
    kept only while they take less memory than H (tokens < 2 in: tokens x in float32 against in^2
    float64). A bank of experts reads, per expert, the rows routed to it or their H: the rows
    while there are fewer calibration tokens than channels (the routed rows, top-k per token, are
    then fewer floats than E float32 H's and cheaper per grid point: Mixtral-8x7B's down_proj input
    at 8 x 256 takes 235 MB of rows against 6.6 GB of H)."""
    if asked != "auto":
        return asked
    if experts:
        return "direct" if tokens < channels else "quadratic"
    if tokens >= 2 * channels:
        return "quadratic"
    if out_features is None:
        return "direct"
    direct = points * out_features * channels * tokens
    quadratic = tokens * channels * channels + points * out_features * channels * channels
    return "direct" if direct < quadratic else "quadratic"


@dataclass
class GroupReport:
    layer: int
    prev_op: str
    layers: list[str]
    ratio: float | None  # None: the identity (plain RTN) won
    loss_rtn: float
    loss_awq: float
    loss_form: str = "forward"  # "forward" (module2inspect run), or a single linear's "quadratic" / "direct"
    exact_points: int = 0  # grid points whose float32 loss was computed (all of them without a screen)
    screen_deviation: float | None = None  # the screen's largest deviation seen, relative to the best loss
    screen: str | None = None  # the grid's screen ("bfloat16", "bfloat16 sketch", "sketch"), None: every point in float32
    grid_passes: int = 0  # passes over grid points (each a vector of losses summed over the ranks)


@dataclass
class ClipReport:
    linear: str
    clipped: bool
    loss_before: float
    loss_after: float
    mean_shrink: float


@dataclass
class SearchResult:
    quantized: dict[str, QuantizedWeight]
    groups: list[GroupReport] = field(default_factory=list)
    clips: list[ClipReport] = field(default_factory=list)
    folded: list[Folded] = field(default_factory=list)  # every fold, in order: what it changed
    seconds: float = 0.0
    guard: GuardReport | None = None  # the held-aside check's verdicts (``awq_graph.guard``)


def rtn(gm: GraphModel, scheme: QuantScheme, progress=None, keep=None, spend: bool = True) -> SearchResult:
    """Round-to-nearest baseline: every quantizable linear, full range, no search (a streamed
    weight is read, quantized and released: one in memory at a time). ``keep`` as in ``awq_search``.
    ``spend``: a released weight may not be read again (False: the search reads it later)."""
    progress = progress or (lambda it, desc, total: it)
    names = quantizable_linears(gm)
    out = {}
    for name in progress(names, "round to nearest", len(names)):
        site = gm.linears[name]
        out[name] = _held(name, quantize(site.matrix(gm.params).detach().float(), scheme), keep)
        if gm.streamed:
            gm.params.release([site.weight], spent=spend)
    return SearchResult(out)


def _held(name: str, qw: QuantizedWeight, keep=None) -> QuantizedWeight:
    """The integers as the compile holds them until they are written: packed (``PackedWeight``,
    half the bytes) and handed to ``keep(name, packed)`` (which may put them on disk); a bank of
    experts too, its (E * out, in) rows packed row by row (the QMoE writer takes rows as they lie)."""
    packed = PackedWeight.of(qw)
    return keep(name, packed) if keep else packed


class _Stat:
    """Per input node: sum |x| per channel, the token count, and what the output error of a
    linear reading it needs, in the form ``loss_form`` chose: H = X^T X ("quadratic", float64),
    or the rows X themselves ("direct", float32). The input of a bank of E experts (rows sorted
    by expert, ``offsets`` the cumulative row counts) gets one H per expert, (E, C, C), from the
    rows routed to it, in float32 (E times the memory of one H: 6.6 GB for Mixtral-8x7B's
    down_proj)."""

    def __init__(self, channels: int, experts: int = 0, form: str = "quadratic", device="cpu", ranks: Ranks = ONE):
        self.form = form
        self.experts = experts
        self.ranks = ranks
        self.abs_sum = torch.zeros(channels, dtype=torch.float64, device=device)
        shape = (experts, channels, channels) if experts else (channels, channels)
        self.gram = (torch.zeros(shape, dtype=torch.float32 if experts else torch.float64, device=device)
                     if form == "quadratic" else None)
        self._rows: list[torch.Tensor] = []
        self._routed: list[list[torch.Tensor]] = [[] for _ in range(experts)]  # a bank's rows, per expert
        self.tokens = 0

    def add(self, x: torch.Tensor, offsets: torch.Tensor | None = None) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()  # (tokens, C)
        if self.experts:
            ends = offsets.tolist()
            x2 = x2[:ends[-1]]  # rows past the last offset are routed nowhere
            for e, (start, end) in enumerate(zip([0] + ends[:-1], ends)):
                if self.form == "direct":
                    self._routed[e].append(x2[start:end])
                else:
                    self.gram[e] += x2[start:end].T @ x2[start:end]
        elif self.form == "direct":
            self._rows.append(x2)
        else:
            self.gram += (x2.T @ x2).double()
        self.abs_sum += x2.abs().sum(0).double()
        self.tokens += x2.shape[0]

    def reduce(self) -> None:
        """Every rank's tokens: the sums (sum |x|, H, the count) summed, the direct form's rows
        gathered (it is chosen when there are fewer tokens than channels: fewer floats than H)."""
        if self.ranks.world == 1:
            return
        self.ranks.sum(self.abs_sum)
        if self.gram is not None:
            self.ranks.sum(self.gram)
        elif self.experts:
            self._routed = [[self.ranks.gather_rows(self._joined(rows))] for rows in self._routed]
        else:
            self._rows = [self.ranks.gather_rows(self._joined(self._rows))]
        self.tokens = int(self.ranks.total(self.tokens))

    @property
    def x_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()

    def _joined(self, rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(rows) if rows else torch.zeros(0, self.abs_sum.shape[0], device=self.abs_sum.device)

    def scaled(self, inv: torch.Tensor | None):
        """H or X of the input x * inv (per channel), in float32; a bank's: (E, C, C), or a list
        of each expert's rows."""
        if self.form == "direct" and self.experts:
            self._routed = [[self._joined(rows)] for rows in self._routed]
            return [rows[0] if inv is None else rows[0] * inv[None, :] for rows in self._routed]
        if self.form == "direct":
            if len(self._rows) > 1:
                self._rows = [torch.cat(self._rows)]
            rows = self._rows[0]
            return rows if inv is None else rows * inv[None, :]
        gram = self.gram.float()
        return gram if inv is None else gram * inv[:, None] * inv[None, :]

    def output_error(self, dw: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
        """sum over tokens of ||x dW^T||^2, ``moment`` being ``scaled(...)``."""
        return direct_output_error(dw, moment) if self.form == "direct" else quadratic_output_error(dw, moment)

    def blocks(self, moment: torch.Tensor, group_size: int) -> torch.Tensor:
        """The diagonal (group, group) blocks of H, for the clipping search."""
        if self.form == "direct":
            return diagonal_blocks_of_rows(moment, group_size)
        return diagonal_blocks(moment, group_size)


def _scatter_mean(values: torch.Tensor, cmap: torch.Tensor, channels: int) -> torch.Tensor:
    total = torch.zeros(channels, device=values.device).index_add_(0, cmap, values.float())
    count = torch.zeros(channels, device=values.device).index_add_(0, cmap, torch.ones_like(values, dtype=torch.float32))
    return total / count.clamp(min=1)


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
    progress = progress or (lambda it, desc, total: it)
    stages = Stages(gm)
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
        folds_before = len(result.folded)
        with torch.no_grad(), (gm.params.hold() if gm.streamed else nullcontext()):
            _search_layer(gm, li, nodes, groups, linears, chunks, stores, stages, opts, result, n_samples * seqlen, keep,
                          ranks, guard)
        fold_layer += [li] * (len(result.folded) - folds_before)
        if gm.streamed:  # the layer leaves memory, but for what its folds edited outside its linears
            _release_layer(gm, nodes, linears, result.folded[folds_before:])
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


HEAD_ROWS = 8192  # rows of the head per pass: the search's temporaries stay a few (rows x in) floats


def head_input_nodes(stages: Stages, head_input) -> list:
    """The post stage's nodes that ``head_input`` (the head's input node) depends on, in graph
    order: what computes the final hidden states, normed, and not the (tokens x vocab) logits."""
    post = stages.stages[stages.n + 1]
    needed = ancestors(head_input, within=set(post))
    return [n for n in post if n in needed]


def search_head(gm: GraphModel, group: ScalingGroup, scheme: QuantScheme, chunks, stores, stages: Stages,
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
    stat = _Stat(group.channels, 0, loss_form(tokens, group.channels, 0, opts.loss_form, site.out_features,
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
        w = site.matrix(gm.params).detach().to(opts.device, torch.float32)  # a tied head's: the table, read afresh
        parts = list(w.split(HEAD_ROWS))
        cmap = torch.tensor(group.channel_map(name), device=opts.device)
        x_mean = _scatter_mean(stat.x_mean, cmap, group.channels)
        w_mean = _scatter_mean(sum(weight_magnitude(p, scheme.group_size) * p.shape[0] for p in parts) / w.shape[0],
                               cmap, group.channels)
        moments, numel = _Moments(stat, opts.linear_screen), stat.tokens * site.out_features

        def loss_of(s, screened=None):
            sc = s[cmap]
            return sum(float(moments.error(scaled_fake_quantize(p, sc, scheme).sub_(p), screened)) for p in parts) / numel

        s, ratio, outcome = grid_search(loss_of, x_mean, w_mean, group, opts.n_grid, opts.device, ranks, moments.screen)
        result.groups.append(GroupReport(stages.n, group.prev_op, [name], ratio, loss_form=stat.form, **outcome))
        col = None
        if s is not None:
            fold_scales(gm.params, replace(group, layers=(), channel_maps=()), s.cpu(), gm.linears)  # the norm only
            result.folded.append(Folded(group, s.cpu(), tuple(group.prev_params)))
            col = s[cmap]
        if not ranks.leader:  # rank 0 alone clips and quantizes the head
            return
        blocks = stat.blocks(stat.scaled(None if col is None else 1.0 / col), scheme.group_size) if opts.clip else None
        pieces, clips = [], []
        for p in parts:
            p = p if col is None else p * col  # the scaled rows, a block at a time
            shrink, clip = _clip_search(name, p, blocks, numel, head_opts, site.node)
            gain = _clip_gain(p, shrink, blocks, clip, head_opts)
            qw = quantize(p, scheme, shrink)
            pieces.append((qw if gain is None else qw.with_gain(gain)).to("cpu"))
            clips.append(clip)
        if clips[0] is not None:  # the sums over the row blocks: one report
            rows = [p.shape[0] for p in parts]
            result.clips.append(ClipReport(name, True, sum(c.loss_before for c in clips), sum(c.loss_after for c in clips),
                                           sum(c.mean_shrink * r for c, r in zip(clips, rows)) / sum(rows)))
        result.quantized[name] = _held(name, QuantizedWeight.concat_rows(pieces), keep)


def _release_layer(gm: GraphModel, nodes, linears, folded: list[Folded]) -> None:
    quantized = {gm.linears[n].weight for n in linears}
    edited = {name for f in folded for name in f.params}
    read = {gm.param_of(a) for node in nodes for a in node.all_input_nodes} - {None}
    gm.params.release(quantized, spent=True)
    gm.params.release(read - quantized - edited)


def _on(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _search_layer(gm, li, nodes, groups, linears, chunks, stores, stages, opts, result, tokens, keep=None,
                  ranks: Ranks = ONE, guard: HeldAsideGuard | None = None):
    """Decoder layer ``li`` in three steps that return records: the scale of each group
    (``GroupReport``), the folds (``Folded``: what each changed), then clip + quantize."""
    def form_of(channels, experts, out_features):
        return loss_form(tokens, channels, experts, opts.loss_form, out_features, opts.loss_points)

    stats, inspect, saved = _layer_statistics(gm, li, nodes, groups, linears, chunks, stores, stages, form_of,
                                              opts.device, ranks)
    scales = []
    for g in groups:
        s, report = _search_group(gm, li, g, stats, inspect, saved, opts, set(linears), ranks)
        result.groups.append(report)
        if s is not None:
            scales.append((g, s.cpu()))  # the folds edit the parameters where they live
    if guard is not None:  # what the layer was before its folds
        guard.snapshot(li, linears, {p for g, _ in scales for p in folded_params(g, gm.linears)})
    folded = [fold_scales(gm.params, g, s, gm.linears) for g, s in scales]
    result.folded.extend(folded)
    quantized, unclipped, clips = _clip_and_quantize(gm, linears, stats, folded, opts, ranks, unclipped=guard is not None)
    if guard is not None:
        held = guard.layer(li, nodes, quantized, unclipped, lambda name, qw: _held(name, qw, keep))
    else:
        held = {name: _held(name, qw, keep) for name, qw in quantized.items()}
    result.quantized.update(held)
    result.clips.extend(clips)


def _layer_statistics(gm, li, nodes, groups, linears, chunks, stores, stages, form_of, device="cpu", ranks=ONE):
    """Run layer ``li`` over every calibration chunk: the statistics of each linear input (in the
    form ``form_of(channels, experts, out_features)`` picks, ``out_features`` the rows of the
    single-linear loss that reads it, None for an input only the clipping reads) from the chunks
    this rank counts, and (the loss chunks) the inputs and outputs of each ``module2inspect`` that is not a single linear. Hands
    the chunks' values on to the next layer through ``stores``. The statistics are then those of
    every rank's tokens (``_Stat.reduce``, in the nodes' order: the same on every rank)."""
    input_nodes = {gm.linears[n].input for n in linears}
    for g in groups:
        input_nodes.add(gm.linears[g.inp].input)
    banks = {gm.linears[n].input: gm.linears[n] for n in linears if gm.linears[n].experts}
    loss_rows = {gm.linears[g.layers[0]].input: gm.linears[g.layers[0]].out_features for g in groups
                 if g.inspects_one_linear}
    stats = {}
    for node in input_nodes:
        channels, experts = node.meta["val"].shape[-1], banks[node].experts if node in banks else 0
        stats[node] = _Stat(channels, experts, form_of(channels, experts, loss_rows.get(node)), device, ranks)
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
    for c, ids in enumerate(chunks.ids):
        env = {**params_env, **stores[c], input_node: ids}
        run_nodes(nodes, env, device)
        if chunks.counted[c]:
            for node, st in stats.items():
                st.add(env[node], env[banks[node].node.args[2]] if node in banks else None)
        if c < chunks.loss:
            for name, (sub, ext, outs) in inspect.items():
                saved[name].append(({a: env[a] for a in ext}, [env[o].clone() for o in outs]))
        stores[c] = {n: env[n] for n in stages.keep_after[li + 1]}
        del env
    for node in sorted(stats, key=lambda n: n.name):
        stats[node].reduce()
    return stats, inspect, saved


def _clip_and_quantize(gm, linears, stats, folded: list[Folded], opts, ranks: Ranks = ONE, unclipped: bool = False):
    """The integers of every quantizable linear of the layer, after the folds: per linear a
    clipping search on its (now scaled) input statistics, then quantize. Returns (integers,
    the integers at full range (``unclipped``; else None), the clipping reports). Over several
    ranks the linears' clipping searches are shared out (linear i on rank i mod world), their
    outcomes sent to rank 0, which alone quantizes."""
    col_scale = {n: None for n in linears}  # the product of the scales folded into each linear's columns
    for f in folded:
        for layer, cmap in zip(f.group.layers, f.group.channel_maps):
            if layer in col_scale:
                col = f.scale[torch.tensor(cmap)]
                col_scale[layer] = col if col_scale[layer] is None else col_scale[layer] * col
    quantized, full_range, clips = {}, ({} if unclipped else None), []
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
            shrink, report = _clip_search(name, w, blocks, stat.tokens * site.out_features, opts, site.node)
            gain = _clip_gain(w, shrink, blocks, report, opts)
        shrink, report, gain = ranks.object_from(owner, (shrink, report, gain))
        if not ranks.leader:
            continue
        if report is not None:
            clips.append(report)
        qw = quantize(w, opts.scheme, shrink)
        quantized[name] = (qw if gain is None else qw.with_gain(gain)).to("cpu")
        if unclipped:
            full_range[name] = quantized[name] if gain is None and (report is None or not report.clipped) else \
                quantize(w, opts.scheme).to("cpu")
    return quantized, full_range, clips


def _clip_gain(w, shrink, blocks, report: ClipReport | None, opts) -> torch.Tensor | None:
    """Where the clipping shrank a range: the gain of each (row, group)'s scale
    (``numerics.output_gain``), computed by the rank that searched the clipping; else None."""
    if report is None or not report.clipped or opts.clip_gain == "off":
        return None
    return output_gain(quantize(w, opts.scheme, shrink), w, blocks, opts.clip_gain).cpu()


def _search_group(gm, li, g: ScalingGroup, stats, inspect, saved, opts, quantized: set[str], ranks: Ranks = ONE):
    """The best scale for group ``g`` (None: the identity); only the layers in ``quantized``
    are rounded in the loss (an MoE router in the group is scaled but stays float)."""
    scheme, device = opts.scheme, opts.device
    inp_stat = stats[gm.linears[g.inp].input]
    inp_map = torch.tensor(g.channel_map(g.inp), device=device)
    x_mean = _scatter_mean(inp_stat.x_mean, inp_map, g.channels)
    weights = {name: gm.linears[name].matrix(gm.params).detach().to(device, torch.float32)
               for name in g.layers if name in quantized}
    if not weights:
        return None, GroupReport(li, g.prev_op, list(g.layers), None, 0.0, 0.0)
    maps = {name: torch.tensor(g.channel_map(name), device=device) for name in g.layers}
    rows = sum(w.shape[0] for w in weights.values())
    w_mean = sum(_scatter_mean(weight_magnitude(w, scheme.group_size), maps[n], g.channels) * w.shape[0]
                 for n, w in weights.items()) / rows

    if g.inspects_one_linear:
        name = g.layers[0]
        stat = stats[gm.linears[name].input]
        moments, form = _Moments(stat, opts.linear_screen), stat.form
        numel = stat.tokens * gm.linears[name].out_features
        screen = moments.screen

        def loss_of(s, screened=None):
            sc = s[maps[name]]
            w = weights[name]
            dw = scaled_fake_quantize(w, sc, scheme).sub_(w)
            return float(moments.error(dw, screened)) / numel
    else:
        form = "forward"
        sub, ext, outs = inspect[g.module2inspect]
        parts = saved[g.module2inspect]  # the loss subsample, in one or two chunks
        placeholders = {name: gm.linears[name].weight_node for name in weights}
        numel = sum(r.numel() for _, refs in parts for r in refs)
        dtype = opts.screen_dtype
        screen = None if dtype is None else opts.linear_screen  # "bfloat16": a subgraph has no sketch
        swaps = [_delta_products(sub, ext_values, device, dtype) for ext_values, _ in parts] if dtype else None

        def loss_of(s, screened=None):
            quantized = {}
            for name, w in weights.items():
                sc = s[maps[name]]
                quantized[placeholders[name]] = gm.linears[name].stored(scaled_fake_quantize(w, sc, scheme))
            total = 0.0
            for k, (ext_values, refs) in enumerate(parts):
                env = {**ext_values, **quantized}
                run_nodes(sub, env, device, swap=swaps[k] if screened is not None else None)
                total += sum(float(((env[o].float() - r.float()) ** 2).sum()) for o, r in zip(outs, refs))
            return total / numel

    best_s, best_ratio, outcome = grid_search(loss_of, x_mean, w_mean, g, opts.n_grid, device, ranks, screen)
    return best_s, GroupReport(li, g.prev_op, list(g.layers), best_ratio, loss_form=form, **outcome)


class _Moments:
    """What a single linear's loss reads: the float32 moment (H or X, ``_Stat.scaled``) for the
    exact loss, and for the screen, rows R with R^T R = H: X itself, or the transposed Cholesky
    factor of H (made once per group, in float32: the screen then sums squares, ||R dW^T||^2,
    where a bfloat16 H's rounding, with the large off-diagonal terms of outlier channels, cancels
    badly). The "sketch" screen reads S R (``gaussian_sketch``: an eighth of R's rows, float32); the
    "bfloat16" screen reads R in bfloat16, or S R in bfloat16 where R has rows enough to sketch
    (Llama-3.2-1B's down_proj at 16 x 512: 8,192 x 8,192 rows, 0.24 s a point in bfloat16, 0.03 s
    sketched, and 0.46 s once for the sketch). A bank of experts' H, an H without a Cholesky
    factor, or rows too few to sketch for the "sketch" screen, have no screen (``screen`` is then
    None: the group's grid runs in float32)."""

    def __init__(self, stat: _Stat, screen: str | None):
        self.stat = stat
        self.exact = stat.scaled(None)
        self.screen_rows, self.screen = None, None
        # R has as many rows as the moment: X's tokens, or H's (square) size
        if screen is None or stat.experts or (screen == "sketch" and
                                              self.exact.shape[0] < SKETCH_RATIO * SKETCH_MIN_ROWS):
            return
        rows = self.exact if stat.form == "direct" else _cholesky_rows(self.exact)
        if rows is None:
            return
        sketched = rows.shape[0] >= SKETCH_RATIO * SKETCH_MIN_ROWS
        if sketched:
            rows = gaussian_sketch(rows, rows.shape[0] // SKETCH_RATIO)
        self.screen_rows = rows.to(torch.bfloat16) if screen == "bfloat16" else rows
        self.screen = "bfloat16 sketch" if sketched and screen == "bfloat16" else screen  # the report's name

    def error(self, dw: torch.Tensor, screened) -> torch.Tensor:
        """The loss's sum ||X dW^T||^2: in float32, or screened (``screened`` set)."""
        if screened is None:
            return self.stat.output_error(dw, self.exact)
        return direct_output_error(dw, self.screen_rows)


def _cholesky_rows(gram: torch.Tensor) -> torch.Tensor | None:
    """R (in, in) with R^T R = H (up to a jitter on the diagonal), float32; None if H has none."""
    top = float(gram.diagonal().max())  # H = X^T X: semidefinite up to the rounding of its sums
    for jitter in (1e-6, 1e-4, 1e-2):  # added to the diagonal, relative to its largest entry
        shifted = gram.clone()
        shifted.diagonal().add_(jitter * top + 1e-30)
        factor, info = torch.linalg.cholesky_ex(shifted)  # float32: the screen's, not the choice's
        del shifted
        if int(info) == 0:
            return factor.mT
    return None


def _delta_products(sub, ext_values: dict, device, dtype: torch.dtype) -> dict:
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


# rows of a weight the clipping search sweeps at once: its temporaries (a few of these blocks) stay
# in the CPU's caches; on a 2048 x 8192 weight 1.7x faster than the whole weight per sweep, the
# same shrinks (rows are independent)
CLIP_BLOCK_ELEMENTS = 1 << 21


def _clip_search(name, w, blocks, numel, opts, node):
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
    """``_clip_search``'s sweeps over a block of rows: (hi, lo, the error at full range, the best
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
