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
point's loss is first computed with its large products in bfloat16 (several times float32's speed
on an AVX512-BF16 CPU), then in float32 for the identity, the screen's best ratio and its neighbours,
and the points within ``SCREEN_MARGIN`` of the best screened loss, and the choice is made from the
float32 losses alone. The screen's own error (its deviations from those float32 losses, less their
common offset) must be under a quarter of the margin, or the margin widens (``grid_search``). The
screen reads rows, X or the Cholesky factor of H (a random sketch of them where they are many);
a subgraph's linears add their change to their float outputs (``_delta_products``).

Then per linear, a clipping search: each group's range [min, max] shrinks by r in
1, 0.95, ..., 0.55 (asymmetric: both ends toward 0), r chosen per (row, group) by
dW_g H_gg dW_g^T on the scaled input. Linears whose output becomes attention scores
(q/k: they feed softmax through RoPE) keep their full range, as in AWQ. The integers on that grid
are rounded to nearest, or (``SearchOptions.rounding="gptq"``) chosen column by column with each
column's error carried onto the columns not yet rounded through H^-1 of the scaled input (GPTQ on
a fixed grid: the scales and zero points stay the clipping's), each row keeping whichever
integers give it the lower output error.

A bank of MoE experts (E, out, in) is searched as its (E * out, in) rows, with one H per
expert from the rows routed to it; routers stay float.

The next layer's calibration input is this layer's float output; folding leaves the float
function unchanged, so the capture pass already computed it.

Over several processes (``core.ranks``), each counts its share of the samples in the statistics,
which are then summed (the direct form's rows gathered); every rank runs the whole loss subsample,
so every loss is the same on every rank, and the grid points and the clipping searches are shared
out; the choices are rank 0's, and rank 0 alone quantizes.
"""
from .grid import grid_search
from .head import HEAD_ROWS, head_input_nodes, search_head
from .layers import Chunks, awq_search
from .options import LOSS_FORMS, ROUNDINGS, SCREEN_MARGIN, SCREENS, SearchOptions, loss_form
from .reports import ClipReport, GroupReport, RoundingReport, SearchResult
from .rounding import hold_integers, rtn
