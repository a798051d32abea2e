"""The search's options, and the loss cost model: which exact form of a linear input's statistics costs less."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
import torch

from ..core.numerics import QuantScheme


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
    # perplexity at a third more search time (docs/how-it-works.md)
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
    # the next layer's calibration input: this layer's "float" output, or its "quantized" output
    # (the layer run again with its integers), so each layer is fitted on the inputs the
    # quantized model will give it
    propagate: str = "float"
    # each token's weight in the losses (the statistics' H, the subgraph errors; not x_mean):
    # "none", or "residual": 1 / the mean square of the layer's output residual at that token, so
    # an error counts as the next norm sees it, relative to its token's size (a few massive-
    # activation tokens otherwise dominate the squared error of the layers that make or remove them)
    token_weight: str = "none"
    # how each linear's integers are chosen on the grid the scales and the clipping made:
    # "nearest" (AWQ's rounding), or "gptq" (error-compensating: each column's rounding error
    # carried onto the columns not yet rounded through H^-1; ``numerics.gptq_integers``), with
    # ``gptq_damp`` of H's mean diagonal added and, ``act_order`` (default), the columns in decreasing H_ii
    rounding: str = "nearest"
    gptq_damp: float = 0.01
    act_order: bool = True

    def __post_init__(self):
        if self.n_grid < 1 or self.clip_grid < 1 or not 0 <= self.max_shrink < 1:
            raise ValueError("n_grid and clip_grid must be >= 1 and 0 <= max_shrink < 1")
        if self.loss_form not in LOSS_FORMS:
            raise ValueError(f"loss_form must be one of {LOSS_FORMS}, got {self.loss_form!r}")
        if self.screen not in SCREENS:
            raise ValueError(f"screen must be one of {SCREENS}, got {self.screen!r}")
        if self.clip_gain not in ("unbiased", "lsq", "off"):
            raise ValueError(f"clip_gain must be 'unbiased', 'lsq' or 'off', got {self.clip_gain!r}")
        if self.propagate not in ("float", "quantized"):
            raise ValueError(f"propagate must be 'float' or 'quantized', got {self.propagate!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if not 0 <= self.gptq_damp <= 1:
            raise ValueError(f"gptq_damp must be within [0, 1], got {self.gptq_damp}")
        if self.token_weight not in ("none", "residual"):
            raise ValueError(f"token_weight must be 'none' or 'residual', got {self.token_weight!r}")

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


ROUNDINGS = ("nearest", "gptq")


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
    then fewer floats than E float32 H's and cheaper per grid point: for a large model's experts,
    hundreds of MB of rows against GBs of H)."""
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
