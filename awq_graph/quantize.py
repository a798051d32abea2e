"""Quantize: the integers the search does not choose, in one place: the head (``--quantize-lm-head``,
8 bits by default) and the token table (int4, for GatherBlockQuantized), both round-to-nearest.
The decoder layers' integers come from the search (clipping and quantization per linear)."""
from __future__ import annotations

from .core.analysis import output_head, token_table
from .core.errors import InputError
from .core.ir import GraphModel
from .core.numerics import QuantizedWeight, QuantScheme, quantize


def quantize_head(gm: GraphModel, scheme: QuantScheme) -> tuple[str, QuantizedWeight]:
    """(the head's module name, its integers): the linear that writes the logits, found in the graph."""
    head = output_head(gm)
    if head is None:
        raise InputError("--quantize-lm-head: no linear layer writes the logits in this graph")
    return head, quantize(gm.linears[head].matrix(gm.params).detach().float(), scheme)


def quantize_token_table(gm: GraphModel, scheme: QuantScheme) -> QuantizedWeight:
    """The table the token lookup reads, rows = tokens (tied to the head or not: the head keeps its own)."""
    return quantize(gm.params[token_table(gm)].detach().float(), scheme)
