"""The statistics of a linear input over the calibration tokens, and what a single linear's loss reads of them."""
from __future__ import annotations

import torch

from ..core.ranks import ONE, Ranks
from ..core.numerics import diagonal_blocks, diagonal_blocks_of_rows, direct_output_error, gaussian_sketch, quadratic_output_error
from .options import SKETCH_MIN_ROWS, SKETCH_RATIO


class InputStats:
    """Per input node: sum |x| per channel, the token count, and what the output error of a
    linear reading it needs, in the form ``loss_form`` chose: H = X^T X ("quadratic", float64),
    or the rows X themselves ("direct", float32). The input of a bank of E experts (rows sorted
    by expert, ``offsets`` the cumulative row counts) gets one H per expert, (E, C, C), from the
    rows routed to it, in float32 (E times the memory of one H: GBs for a large model's
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

    def add(self, x: torch.Tensor, offsets: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> None:
        """``weight``: one per token (x's leading dims), in H (X^T diag(w) X) and in the rows
        (sqrt(w) x), not in sum |x|; a bank's rows are routed, not tokens: unweighted."""
        x2 = x.reshape(-1, x.shape[-1]).float()  # (tokens, C)
        if weight is None or self.experts or weight.numel() != x2.shape[0]:
            weighted = x2
        else:
            weighted = x2 * weight.reshape(-1, 1).to(x2.device, torch.float32).sqrt()
        if self.experts:
            ends = offsets.tolist()
            x2 = x2[:ends[-1]]  # rows past the last offset are routed nowhere
            for e, (start, end) in enumerate(zip([0] + ends[:-1], ends)):
                if self.form == "direct":
                    self._routed[e].append(x2[start:end])
                else:
                    self.gram[e] += x2[start:end].T @ x2[start:end]
        elif self.form == "direct":
            self._rows.append(weighted)
        else:
            self.gram += (weighted.T @ weighted).double()
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


def scatter_mean(values: torch.Tensor, cmap: torch.Tensor, channels: int) -> torch.Tensor:
    total = torch.zeros(channels, device=values.device).index_add_(0, cmap, values.float())
    count = torch.zeros(channels, device=values.device).index_add_(0, cmap, torch.ones_like(values, dtype=torch.float32))
    return total / count.clamp(min=1)


class Moments:
    """What a single linear's loss reads: the float32 moment (H or X, ``InputStats.scaled``) for the
    exact loss, and for the screen, rows R with R^T R = H: X itself, or the transposed Cholesky
    factor of H (made once per group, in float32: the screen then sums squares, ||R dW^T||^2,
    where a bfloat16 H's rounding, with the large off-diagonal terms of outlier channels, cancels
    badly). The "sketch" screen reads S R (``gaussian_sketch``: an eighth of R's rows, float32); the
    "bfloat16" screen reads R in bfloat16, or S R in bfloat16 where R has rows enough to sketch
    (a sketch costs once about what two bfloat16 points cost, and makes every point several times
    cheaper). A bank of experts' H, an H without a Cholesky
    factor, or rows too few to sketch for the "sketch" screen, have no screen (``screen`` is then
    None: the group's grid runs in float32)."""

    def __init__(self, stat: InputStats, screen: str | None):
        self.stat = stat
        self.exact = stat.scaled(None)
        self.screen_rows, self.screen = None, None
        # R has as many rows as the moment: X's tokens, or H's (square) size
        if screen is None or stat.experts or (screen == "sketch" and
                                              self.exact.shape[0] < SKETCH_RATIO * SKETCH_MIN_ROWS):
            return
        rows = self.exact if stat.form == "direct" else cholesky_rows(self.exact)
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


def cholesky_rows(gram: torch.Tensor) -> torch.Tensor | None:
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
