"""Quantization numerics: pure tensor functions, no graph or model imports.

Group convention (documented once, used everywhere): a weight ``W`` of shape (out, in) is
split along ``in`` into groups of ``group_size`` consecutive columns. When ``group_size``
does not divide ``in`` (SmolLM2: 576 = 4 x 128 + 64) the last group of every row is simply
shorter; MatMulNBits stores it padded with zeros. Every function here quantizes that short
group as it is: its range comes from its own columns only.

Integers are stored unsigned, 0 .. 2^bits - 1, and dequantize as ``(q - zero) * scale``.
A symmetric scheme is the special case ``zero = 2^(bits-1)`` (8 for 4 bits), which is also
MatMulNBits' default zero point, so symmetric models carry no zero-point input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import SchemeError

SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class QuantScheme:
    """Weight-only integer scheme, checked when built."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise SchemeError(
                f"bits={self.bits} is not supported: MatMulNBits is emitted with bits in {list(SUPPORTED_BITS)}"
            )
        gs = self.group_size
        if not isinstance(gs, int) or gs < 16 or gs & (gs - 1):
            raise SchemeError(
                f"group size {gs} is not supported: MatMulNBits needs a power of two >= 16 (e.g. 32, 64, 128)"
            )

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def sym_zero(self) -> int:
        return 2 ** (self.bits - 1)

    @property
    def name(self) -> str:
        """Quark-style name: ``uint4_wo_128`` (asymmetric) or ``int4_wo_128`` (symmetric)."""
        return f"{'int' if self.symmetric else 'uint'}{self.bits}_wo_{self.group_size}"

    @classmethod
    def parse(cls, name: str) -> "QuantScheme":
        """``uint4_wo_128`` -> QuantScheme(4, 128, symmetric=False)."""
        parts = name.split("_")
        if len(parts) != 3 or parts[1] != "wo" or not parts[0].rstrip("0123456789") in ("int", "uint"):
            raise SchemeError(f"scheme {name!r} is not of the form uint4_wo_128 or int4_wo_64")
        kind = parts[0].rstrip("0123456789")
        try:
            bits, group = int(parts[0][len(kind):]), int(parts[2])
        except ValueError:
            raise SchemeError(f"scheme {name!r} is not of the form uint4_wo_128 or int4_wo_64") from None
        return cls(bits=bits, group_size=group, symmetric=(kind == "int"))


def n_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, G, group_size), the short last group padded by repeating its last
    column, which leaves every group's min, max and absmax unchanged."""
    out_f, in_f = w.shape
    pad = n_groups(in_f, group_size) * group_size - in_f
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out_f, pad)], dim=1)
    return w.reshape(out_f, -1, group_size)


def from_groups(wg: torch.Tensor, in_features: int) -> torch.Tensor:
    """(out, G, group_size) -> (out, in): drops the padding ``to_groups`` added."""
    return wg.reshape(wg.shape[0], -1)[:, :in_features]


@dataclass(frozen=True)
class QuantizedWeight:
    """The integers of one linear: ``W ~ (q - zero[:, g]) * scale[:, g]`` per group g."""

    q: torch.Tensor  # (out, in) uint8 in 0 .. 2^bits-1
    scale: torch.Tensor  # (out, G) float32
    zero: torch.Tensor  # (out, G) uint8
    scheme: QuantScheme

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero, self.scheme.group_size)

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.q.to(device), self.scale.to(device), self.zero.to(device), self.scheme)

    def with_gain(self, gain: torch.Tensor) -> "QuantizedWeight":
        """The same integers with each (row, group)'s scale times ``gain`` (out, G)."""
        return QuantizedWeight(self.q, self.scale * gain.to(self.scale.device, self.scale.dtype), self.zero, self.scheme)

    def take_rows(self, index) -> "QuantizedWeight":
        """Some output rows (a slice or an index tensor), e.g. one expert of a bank."""
        return QuantizedWeight(self.q[index], self.scale[index], self.zero[index], self.scheme)

    @staticmethod
    def concat_rows(parts: list) -> "QuantizedWeight":
        """The rows of several weights of one input width and scheme (any held kind), one after the other."""
        return QuantizedWeight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                               torch.cat([p.zero for p in parts]), parts[0].scheme)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)


def group_extrema(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, ...]:
    """What ``group_range`` reads of ``w``, per (row, group): (absmax,) when symmetric, else
    (min clamped to <= 0, max clamped to >= 0). Computed once, it serves many shrinks (the
    clipping search's sweeps)."""
    wg = to_groups(w, scheme.group_size)  # (out, G, gs)
    if scheme.symmetric:
        return (wg.abs().amax(dim=2),)
    # two reductions, not torch.aminmax: on CPU (torch 2.13) aminmax over the groups' last
    # dimension takes 13 ms for a 2048 x 8192 weight, amin and amax 1.6 ms each (the same values)
    return wg.amin(dim=2).clamp_(max=0), wg.amax(dim=2).clamp_(min=0)


def group_range(w: torch.Tensor, scheme: QuantScheme, shrink=1.0, extrema: tuple | None = None):
    """Per-group scale and zero point, range shrunk by ``shrink``.

    ``shrink``: a scalar or (out, G) tensor for both ends, or a pair (for max, for min).
    Asymmetric: [min, max] -> [shrink_min*min, shrink_max*max] (each end moves toward 0 on
    its own, so the clipping search respects the asymmetric range); scale = (max - min) / qmax,
    zero = round(-min / scale). Symmetric: absmax -> shrink*absmax, scale = absmax / (2^(b-1) - 1).
    ``extrema``: ``group_extrema(w, scheme)`` when already computed.
    Returns (scale, zero) as (out, G) float tensors.
    """
    hi, lo = shrink if isinstance(shrink, tuple) else (shrink, shrink)
    extrema = extrema if extrema is not None else group_extrema(w, scheme)
    if scheme.symmetric:
        absmax = extrema[0] * hi
        scale = absmax.clamp(min=1e-8) / (scheme.sym_zero - 1)
        zero = torch.full_like(scale, float(scheme.sym_zero))
    else:
        wmax = extrema[1] * hi
        wmin = extrema[0] * lo
        scale = (wmax - wmin).clamp_(min=1e-8) / scheme.qmax
        zero = torch.round(-wmin / scale).clamp_(0, scheme.qmax)
    return scale, zero


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Integers of ``w`` for the given per-group (scale, zero): (out, in) float holding 0..qmax."""
    wg = to_groups(w, scheme.group_size)
    return from_groups(_integers_into(torch.empty_like(wg), wg, scale.unsqueeze(2), zero.unsqueeze(2), scheme),
                       w.shape[1])


def _integers_into(out: torch.Tensor, wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   scheme: QuantScheme) -> torch.Tensor:
    """round(wg / scale + zero) clamped to 0..qmax, per group ((out, G, gs) against (out, G, 1)),
    made in ``out`` (which may be ``wg`` itself): the one rounding every quantizer here shares."""
    return torch.div(wg, scale, out=out).add_(zero).round_().clamp_(0, scheme.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """(q - zero) * scale per group -> (out, in) float32."""
    in_f = q.shape[1]
    qg = to_groups(q.to(torch.float32, copy=True), group_size)  # a copy: the products go into it
    return from_groups(qg.sub_(zero.float().unsqueeze(2)).mul_(scale.float().unsqueeze(2)), in_f)


QUANTIZE_ROWS = 8192  # rows per pass: an expert bank (Mixtral's gate_up: 229,376 rows) a block at a time


def quantize(w: torch.Tensor, scheme: QuantScheme, shrink=1.0) -> QuantizedWeight:
    """The integers of ``w`` (out, in) per group, ranges shrunk by ``shrink`` (as ``group_range``).
    Rows are independent: taken ``QUANTIZE_ROWS`` at a time, the float temporaries stay a few
    (rows x in) whatever the weight (a float32 copy of Mixtral-8x7B's gate_up bank is 3.8 GB)."""
    if w.shape[0] > QUANTIZE_ROWS:
        parts = [quantize(w[r:r + QUANTIZE_ROWS], scheme, _rows_of(shrink, r, QUANTIZE_ROWS))
                 for r in range(0, w.shape[0], QUANTIZE_ROWS)]
        return QuantizedWeight.concat_rows(parts)
    scale, zero = group_range(w, scheme, shrink)
    q = quantize_with(w, scale, zero, scheme)
    return QuantizedWeight(q.to(torch.uint8), scale.float(), zero.to(torch.uint8), scheme)


def _rows_of(shrink, start: int, count: int):
    """``shrink`` (a scalar, an (out, G) tensor, or a pair of either) for rows start .. start + count."""
    if isinstance(shrink, tuple):
        return tuple(_rows_of(s, start, count) for s in shrink)
    return shrink[start:start + count] if isinstance(shrink, torch.Tensor) and shrink.dim() else shrink


def fake_quantize(w: torch.Tensor, scheme: QuantScheme, shrink=1.0, extrema: tuple | None = None) -> torch.Tensor:
    """dequantize(quantize(w)) in float, shape of ``w`` (``extrema``: as for ``group_range``)."""
    scale, zero = group_range(w, scheme, shrink, extrema)
    wg = to_groups(w, scheme.group_size)
    scale, zero = scale.unsqueeze(2), zero.unsqueeze(2)
    q = _integers_into(torch.empty_like(wg), wg, scale, zero, scheme)  # then in place: one buffer
    return from_groups(q.sub_(zero).mul_(scale), w.shape[1])


def scaled_fake_quantize(w: torch.Tensor, col_scale: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """fake_quantize(w * s) / s for a scale s per input column: what a scaled weight computes once
    quantized, in w's units. ``QUANTIZE_ROWS`` rows at a time: one more weight's worth of memory
    (a Mixtral-8x7B gate_up bank's float32 copy is 3.8 GB), not four."""
    out = torch.empty_like(w)
    for r in range(0, w.shape[0], QUANTIZE_ROWS):
        part = torch.mul(w[r:r + QUANTIZE_ROWS], col_scale, out=out[r:r + QUANTIZE_ROWS])
        _fake_quantize_in_place(part, scheme).div_(col_scale)
    return out


def _fake_quantize_in_place(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``w`` made ``fake_quantize(w, scheme)`` in its own buffer (the same operations, no
    temporary of its size when the group size divides its width)."""
    if w.shape[1] % scheme.group_size:
        return w.copy_(fake_quantize(w, scheme))
    scale, zero = group_range(w, scheme)
    scale, zero = scale.unsqueeze(2), zero.unsqueeze(2)
    wg = to_groups(w, scheme.group_size)  # a view of w: the group size divides its width
    _integers_into(wg, wg, scale, zero, scheme).sub_(zero).mul_(scale)
    return w


# ---------------------------------------------------------------------------------------
# AWQ statistics and losses


def weight_magnitude(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """AWQ's weight statistic per input column: |W| normalized by its group's absmax,
    averaged over output rows. (out, in) -> (in,)."""
    wg = to_groups(w.abs(), group_size)
    wg = wg / wg.amax(dim=2, keepdim=True).clamp(min=1e-8)
    return from_groups(wg, w.shape[1]).mean(dim=0)


def awq_candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    """s(a) = x_mean^a / w_mean^(1-a), normalized so that sqrt(max(s) * min(s)) = 1.

    ``x_mean``: mean |activation| per channel, ``w_mean``: ``weight_magnitude`` per channel.
    """
    s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def quadratic_output_error(dw: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """sum over tokens of ||x dW^T||^2 = tr(dW H dW^T), H = X^T X: (out, in), (in, in) -> scalar.

    A bank of E experts: dW (E * out, in) expert by expert and H (E, in, in), each expert's
    rows against the tokens routed to it."""
    if gram.dim() == 3:
        dwe = dw.reshape(gram.shape[0], -1, dw.shape[1])
        return (torch.bmm(dwe, gram) * dwe).sum()
    return ((dw @ gram) * dw).sum()


def direct_output_error(dw: torch.Tensor, rows) -> torch.Tensor:
    """The same sum as ``quadratic_output_error`` from the input rows X (tokens, in) instead of
    H = X^T X: ||X dW^T||^2, costing out x in x tokens instead of out x in^2 (cheaper when there
    are fewer tokens than input channels). The product runs in the rows' dtype.

    A bank of E experts: dW (E * out, in) expert by expert and ``rows`` a list of E (tokens_e, in),
    each expert's rows against the tokens routed to it."""
    if isinstance(rows, list):
        parts = dw.reshape(len(rows), -1, dw.shape[1])
        return sum((direct_output_error(d, r) for d, r in zip(parts, rows)), torch.zeros((), device=dw.device))
    return (rows @ dw.T.to(rows.dtype)).float().square().sum()


def gaussian_sketch(rows: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """S R for rows R (n, in) and S (k, n) of independent N(0, 1/k) entries (a fixed seed): for
    every dW, ||S R dW^T||^2 estimates ||R dW^T||^2 without bias (Johnson-Lindenstrauss), at k/n
    of its cost. Float32, S made a block of its columns at a time."""
    gen = torch.Generator(device=rows.device).manual_seed(seed)
    out = torch.zeros(k, rows.shape[1], device=rows.device)
    for r in range(0, rows.shape[0], SKETCH_BLOCK):
        block = rows[r:r + SKETCH_BLOCK].float()
        s = torch.randn(k, block.shape[0], generator=gen, device=rows.device).div_(math.sqrt(k))
        out.addmm_(s, block)
    return out


SKETCH_BLOCK = 4096  # rows of R per product of the sketch


def diagonal_blocks(gram: torch.Tensor, group_size: int) -> torch.Tensor:
    """The diagonal (group, group) blocks H_gg of H (in, in) -> (G, gs, gs), the last one padded
    with zeros; experts' (E, in, in) -> (E, G, gs, gs)."""
    if gram.dim() == 3:
        return torch.stack([diagonal_blocks(h, group_size) for h in gram])
    in_f = gram.shape[0]
    g = n_groups(in_f, group_size)
    pad = g * group_size - in_f
    hp = F.pad(gram, (0, pad, 0, pad)) if pad else gram  # F.pad copies even when it adds nothing
    idx = torch.arange(g)
    return hp.reshape(g, group_size, g, group_size)[idx, :, idx, :]


def diagonal_blocks_of_rows(rows, group_size: int) -> torch.Tensor:
    """``diagonal_blocks`` of X^T X from the rows X (tokens, in), without forming H; a bank's list
    of E experts' rows -> (E, G, gs, gs)."""
    if isinstance(rows, list):
        return torch.stack([diagonal_blocks_of_rows(r, group_size) for r in rows])
    tokens, in_f = rows.shape
    g = n_groups(in_f, group_size)
    pad = g * group_size - in_f
    xg = (F.pad(rows, (0, pad)) if pad else rows).reshape(tokens, g, group_size)
    return torch.einsum("tgi,tgj->gij", xg, xg)


def blockwise_error(dw: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Per (row, group) output error dW_g H_gg dW_g^T from the diagonal blocks, ignoring
    cross-group terms: (out, in), (G, gs, gs) -> (out, G); experts (E * out, in), (E, G, gs, gs)
    -> (E * out, G), each expert's rows against its own blocks. This is the clipping objective:
    every group's range is chosen on its own, as AWQ's clip search does, but on all calibration
    tokens."""
    if blocks.dim() == 4:
        parts = dw.reshape(blocks.shape[0], -1, dw.shape[1])
        return torch.cat([blockwise_error(d, b) for d, b in zip(parts, blocks)])
    g, group_size = blocks.shape[0], blocks.shape[1]
    out_f, in_f = dw.shape
    pad = g * group_size - in_f
    dwp = (F.pad(dw, (0, pad)) if pad else dw).reshape(out_f, g, group_size)  # (out, G, gs)
    return torch.einsum("ogi,gij,ogj->og", dwp, blocks, dwp)


def blockwise_inner(a: torch.Tensor, b: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Per (row, group) a_g H_gg b_g^T (``blockwise_error``'s form with two matrices): the
    covariance of the two groups' outputs over the calibration tokens; (out, in) x2 -> (out, G)."""
    if blocks.dim() == 4:
        n = blocks.shape[0]
        return torch.cat([blockwise_inner(x, y, h) for x, y, h in
                          zip(a.reshape(n, -1, a.shape[1]), b.reshape(n, -1, b.shape[1]), blocks)])
    g, group_size = blocks.shape[0], blocks.shape[1]
    out_f, in_f = a.shape
    pad = g * group_size - in_f

    def grouped(x):
        return (F.pad(x, (0, pad)) if pad else x).reshape(out_f, g, group_size)

    return torch.einsum("ogi,gij,ogj->og", grouped(a), blocks, grouped(b))


# a group's gain (``output_gain``) stays within these: a range clipped by at most half
GAIN_LIMITS = (0.8, 1.25)


def output_gain(qw: "QuantizedWeight", w: torch.Tensor, blocks: torch.Tensor, rule: str = "lsq") -> torch.Tensor:
    """Per (row, group) the gain c for ``qw``'s scales that keeps the group's output at the float
    output's size: "lsq", c = <q, w>_H / <q, q>_H, the least-squares gain, leaves the output error
    (c q - w) x uncorrelated with the quantized output c q x over the calibration tokens (H_gg:
    ``blocks``), short of the float output by the square of the error only; "unbiased",
    c = <w, w>_H / <q, w>_H, leaves it uncorrelated with the float output w x. (out, G), within
    ``GAIN_LIMITS``.

    A clipped range rounds its large weights toward zero: its integers alone would shrink every
    output they make, a coherent error that adds up over rows, layers and tokens where rounding's
    scattered errors cancel (docs/quality-on-a-1.5b-model.md: the 1.5B model where clipping
    lowered every layer's error and raised the perplexity)."""
    dq = qw.dequantize()
    if rule == "unbiased":
        num, den = blockwise_inner(w, w, blocks), blockwise_inner(dq, w, blocks)
    elif rule == "lsq":
        num, den = blockwise_inner(dq, w, blocks), blockwise_inner(dq, dq, blocks)
    else:
        raise ValueError(f"gain rule {rule!r}: 'unbiased' or 'lsq'")
    return torch.where((den > 0) & (num > 0), num / den.clamp(min=1e-30), torch.ones_like(den)).clamp(*GAIN_LIMITS)


def blockwise_quadratic_error(dw: torch.Tensor, gram: torch.Tensor, group_size: int) -> torch.Tensor:
    """``blockwise_error`` straight from H (in, in), or experts' (E, in, in)."""
    return blockwise_error(dw, diagonal_blocks(gram, group_size))


# ---------------------------------------------------------------------------------------
# Error-compensating rounding (GPTQ) on a fixed group grid


GPTQ_BLOCK = 128  # columns per lazy batch: the rest of the weight is updated once per block


def gptq_integers(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme,
                  gram: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> torch.Tensor:
    """The integers of ``w`` (out, in) on the grid (``scale``, ``zero``: (out, G), kept as they
    are) chosen column by column, each column's rounding error carried onto the columns not yet
    rounded through the inverse of H = X^T X (``gram``, (in, in)): GPTQ (Frantar et al. 2022) with
    its grid fixed beforehand ("static groups"), so the written scales, zero points and layout are
    those of round-to-nearest on the same grid. Returns (out, in) uint8.

    ``damp``: the fraction of H's mean diagonal added to its diagonal (an H from few tokens, or with
    dead channels, is singular; GPTQ's 1%). A dead channel (H_ii = 0) is rounded to nearest and
    carries nothing. ``act_order``: columns in decreasing H_ii (the channels with the largest
    inputs rounded first, while the most columns remain to absorb their error); each column keeps
    its own group's scale and zero point, so the grid does not depend on the order."""
    out_f, in_f = w.shape
    h = gram.to(w.device, torch.float32, copy=True)
    diag = h.diagonal()
    diag[diag <= 0] = 1.0  # a dead channel: its error goes nowhere (its row and column of H are 0)
    order = torch.argsort(diag, descending=True) if act_order else torch.arange(in_f, device=w.device)
    h = h[order][:, order]
    upper = _inverse_cholesky_upper(h, damp)
    del h
    cols = order.div(scheme.group_size, rounding_mode="floor")
    s_cols, z_cols = scale.float()[:, cols], zero.float()[:, cols]
    work = w.float()[:, order].clone()
    q = torch.empty(out_f, in_f, dtype=torch.uint8, device=w.device)
    for b0 in range(0, in_f, GPTQ_BLOCK):
        b1 = min(b0 + GPTQ_BLOCK, in_f)
        block, u = work[:, b0:b1], upper[b0:b1, b0:b1]
        errors = torch.empty_like(block)
        for i in range(b1 - b0):
            col, s, z = block[:, i], s_cols[:, b0 + i], z_cols[:, b0 + i]
            qi = torch.div(col, s).add_(z).round_().clamp_(0, scheme.qmax)  # the rounding of ``_integers_into``
            err = (col - (qi - z) * s) / u[i, i]
            block[:, i + 1:] -= err[:, None] * u[i, i + 1:][None, :]
            errors[:, i] = err
            q[:, b0 + i] = qi.to(torch.uint8)
        if b1 < in_f:
            work[:, b1:] -= errors @ upper[b0:b1, b1:]
    out = torch.empty_like(q)
    out[:, order] = q
    return out


def _inverse_cholesky_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp mean(diag H) I)^-1, the damping raised tenfold
    (to at most 1) until H factors."""
    mean = float(h.diagonal().mean())
    for d in (damp, damp * 10, damp * 100, 1.0):
        shifted = h.clone()
        shifted.diagonal().add_(max(d, 0.0) * mean + 1e-12)
        factor, info = torch.linalg.cholesky_ex(shifted)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        if d >= 1.0:
            break
    raise ValueError("H has no Cholesky factor even damped by its mean diagonal")


def rowwise_output_error(dw: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per row r of dW (out, in): dW_r H dW_r^T, (out,). The rows of an error-compensating
    rounding are independent of each other, so each row's integers can be compared on their own."""
    return ((dw @ gram.to(dw.dtype)) * dw).sum(1)


# ---------------------------------------------------------------------------------------
# MatMulNBits packing


@dataclass(frozen=True)
class PackedWeight:
    """A 2-D ``QuantizedWeight`` held in MatMulNBits' layout (``pack_matmulnbits``): half a byte
    per 4-bit integer instead of one, and the very arrays the ONNX initializers are made of, so
    a compile holds each layer's integers once, packed, from its search to the file. ``q``,
    ``scale`` and ``zero`` unpack on demand (tests, the torch reference)."""

    blob: torch.Tensor  # (N, k_blocks, blob bytes) uint8
    scales: torch.Tensor  # (N * k_blocks,) float32
    zeros: torch.Tensor | None  # (N * ceil(k_blocks * bits / 8),) uint8, None when symmetric
    shape: tuple[int, int]  # (out, in)
    scheme: QuantScheme

    @staticmethod
    def of(qw: QuantizedWeight) -> "PackedWeight":
        blob, scales, zeros = pack_matmulnbits(qw)
        return PackedWeight(torch.from_numpy(blob), torch.from_numpy(scales),
                            None if zeros is None else torch.from_numpy(zeros), qw.shape, qw.scheme)

    def unpack(self) -> QuantizedWeight:
        return QuantizedWeight(self.q, self.scale, self.zero, self.scheme)

    @property
    def q(self) -> torch.Tensor:
        n, k = self.shape
        q = _unpack_nibbles(self.blob) if self.scheme.bits == 4 else self.blob
        return q.reshape(n, -1)[:, :k].contiguous()

    @property
    def scale(self) -> torch.Tensor:
        return self.scales.reshape(self.shape[0], -1)

    @property
    def zero(self) -> torch.Tensor:
        n, kb = self.shape[0], self.blob.shape[1]
        if self.zeros is None:
            return torch.full((n, kb), self.scheme.sym_zero, dtype=torch.uint8)
        zero = self.zeros.reshape(n, -1)
        return (_unpack_nibbles(zero) if self.scheme.bits == 4 else zero)[:, :kb].contiguous()

    def dequantize(self) -> torch.Tensor:
        return self.unpack().dequantize()

    def to(self, device) -> "PackedWeight | QuantizedWeight":
        return self if torch.device(device).type == "cpu" else self.unpack().to(device)

    def take_rows(self, index) -> "PackedWeight":
        """Some output rows (a slice or an index tensor), still packed: a row's integers, scales
        and zero points are bytes of its own in each array, so rows are taken as they lie."""
        n = self.shape[0]
        blob = self.blob[index].contiguous()
        scales = self.scales.reshape(n, -1)[index].reshape(-1).contiguous()
        zeros = None if self.zeros is None else self.zeros.reshape(n, -1)[index].reshape(-1).contiguous()
        return PackedWeight(blob, scales, zeros, (blob.shape[0], self.shape[1]), self.scheme)

    @staticmethod
    def concat_rows(parts: list["PackedWeight"]) -> "PackedWeight":
        """The rows of several packed weights of one input width and scheme, still packed."""
        first = parts[0]
        zeros = None if first.zeros is None else torch.cat([p.zeros.reshape(p.shape[0], -1) for p in parts]).reshape(-1)
        return PackedWeight(torch.cat([p.blob for p in parts]), torch.cat([p.scales for p in parts]), zeros,
                            (sum(p.shape[0] for p in parts), first.shape[1]), first.scheme)


def pack_matmulnbits(qw: QuantizedWeight):
    """Pack for com.microsoft::MatMulNBits; 4 bits go low nibble first.

    Returns (B, scales, zero_points): B uint8 (N, k_blocks, block_size * bits / 8) with the
    short last block padded with zeros; scales float32 (N * k_blocks,); zero_points uint8,
    packed like B (N * ceil(k_blocks * bits / 8),), or None for a symmetric scheme
    (MatMulNBits' default zero point is 2^(bits-1)).
    """
    if isinstance(qw, PackedWeight):  # packed already: its own arrays
        return qw.blob.numpy(), qw.scales.numpy(), None if qw.zeros is None else qw.zeros.numpy()
    scheme = qw.scheme
    bs = scheme.group_size
    q = qw.q.to(torch.uint8)
    n, k = q.shape
    kb = n_groups(k, bs)
    q = F.pad(q, (0, kb * bs - k)).reshape(n, kb, bs)
    packed = pack_nibbles(q) if scheme.bits == 4 else q
    scales = qw.scale.to(torch.float32).reshape(-1)
    if scheme.symmetric:
        return packed.numpy(), scales.numpy(), None
    zp = qw.zero.to(torch.uint8)
    if scheme.bits == 4:
        zp = pack_nibbles(F.pad(zp, (0, kb % 2), value=scheme.sym_zero))
    return packed.numpy(), scales.numpy(), zp.reshape(-1).numpy()


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Pairs along the last axis into one byte each: element 2i low nibble, 2i+1 high."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``pack_nibbles`` undone: each byte back to two elements, low nibble first."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
