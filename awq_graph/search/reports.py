"""What the search returns: per group its scale's report, per linear its clipping's, the folds and the integers."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..core.numerics import QuantizedWeight
from ..guard import GuardReport
from ..passes.fold import Folded


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
class RoundingReport:
    """A linear's error-compensating rounding: the output loss (tr(dW H dW^T) on the calibration
    input) of rounding to nearest on the same grid, and after; rows whose new integers were not
    better keep the nearest ones (``rows_kept_nearest``)."""

    linear: str
    rounding: str
    loss_nearest: float
    loss_after: float
    rows_kept_nearest: int


@dataclass
class SearchResult:
    quantized: dict[str, QuantizedWeight]
    groups: list[GroupReport] = field(default_factory=list)
    clips: list[ClipReport] = field(default_factory=list)
    roundings: list[RoundingReport] = field(default_factory=list)
    folded: list[Folded] = field(default_factory=list)  # every fold, in order: what it changed
    seconds: float = 0.0
    guard: GuardReport | None = None  # the held-aside check's verdicts (``awq_graph.guard``)
