"""Round-to-nearest, and the integers as the compile holds them until they are written."""
from __future__ import annotations


from ..core.analysis import quantizable_linears
from ..core.ir import GraphModel
from ..core.numerics import PackedWeight, QuantScheme, QuantizedWeight, quantize
from ..core.progress import no_progress
from .reports import SearchResult


def rtn(gm: GraphModel, scheme: QuantScheme, progress=None, keep=None, spend: bool = True) -> SearchResult:
    """Round-to-nearest baseline: every quantizable linear, full range, no search (a streamed
    weight is read, quantized and released: one in memory at a time). ``keep`` as in ``awq_search``.
    ``spend``: a released weight may not be read again (False: the search reads it later)."""
    progress = progress or no_progress
    names = quantizable_linears(gm)
    out = {}
    for name in progress(names, "round to nearest", len(names)):
        site = gm.linears[name]
        out[name] = hold_integers(name, quantize(site.matrix(gm.params).detach().float(), scheme), keep)
        if gm.streamed:
            gm.params.release([site.weight], spent=spend)
    return SearchResult(out)


def hold_integers(name: str, qw: QuantizedWeight, keep=None) -> QuantizedWeight:
    """The integers as the compile holds them until they are written: packed (``PackedWeight``,
    half the bytes) and handed to ``keep(name, packed)`` (which may put them on disk); a bank of
    experts too, its (E * out, in) rows packed row by row (the QMoE writer takes rows as they lie)."""
    packed = PackedWeight.of(qw)
    return keep(name, packed) if keep else packed
