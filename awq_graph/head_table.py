"""The head and the token table: the integers the search does not choose, in one place: the head (``quantize_lm_head``,
8 bits by default; round-to-nearest when there is no calibration, else the search chooses them)
and the token table (4 or 8 bits, for GatherBlockQuantized): its own integers, or the head's when the
two are tied with the same scheme (one copy in the file, as onnxruntime-genai's builder writes it). The decoder layers'
integers come from the search (clipping and quantization per linear)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .core.analysis import head_reads_token_table, output_head, token_table
from .core.errors import InputError
from .core.ir import GraphModel
from .core.numerics import QuantizedWeight, QuantScheme, quantize


def quantize_head(gm: GraphModel, scheme: QuantScheme) -> tuple[str, QuantizedWeight]:
    """(the head's module name, its integers): the linear that writes the logits, found in the graph."""
    head = output_head(gm)
    if head is None:
        raise InputError("`quantize_lm_head`: no linear layer writes the logits in this graph")
    return head, quantize(gm.linears[head].matrix(gm.params).detach().float(), scheme)


@dataclass(frozen=True)
class TokenTable:
    """The integers the token lookup reads, rows = tokens: the table's own, or (``head`` set) the
    tied head's, whose rows hold W * s when the head's search scaled it (``inverse_scale`` = 1 / s
    per hidden channel, multiplied after the lookup)."""

    quantized: QuantizedWeight
    head: str | None = None
    inverse_scale: torch.Tensor | None = None

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """What the lookup returns for ``ids``, in float32 (the reference the check compares with)."""
        rows = torch.nn.functional.embedding(ids, self.quantized.dequantize())
        return rows if self.inverse_scale is None else rows * self.inverse_scale


def quantize_token_table(gm: GraphModel, scheme: QuantScheme) -> TokenTable:
    """The table the token lookup reads, quantized on its own (tied to the head or not)."""
    return TokenTable(quantize(gm.params[token_table(gm)].detach().float(), scheme))


def token_table_of_head(head: str, quantized: QuantizedWeight, folded) -> TokenTable:
    """The lookup reads the integers of ``head``, which is tied to the token table; ``folded``: the
    head search's fold records (a scale folded into the final norm, and into the head's copy)."""
    scale = next((f.group.column_scale(f.scale, head) for f in folded if f.group.layers == (head,)), None)
    return TokenTable(quantized, head, None if scale is None else 1.0 / scale)


def shares_head(gm: GraphModel, head_scheme: QuantScheme, table_scheme: QuantScheme) -> bool:
    """The head is tied to the token table and both have as many bits: one set of integers, the
    head's, serves both (MatMulNBits' blocks of the head are GatherBlockQuantized's rows)."""
    return head_reads_token_table(gm) and head_scheme.bits == table_scheme.bits
