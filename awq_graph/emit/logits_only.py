"""The logits-only graph: torch.onnx of the folded float program (any architecture torch.onnx
can translate), whose quantized linears ``awq_graph.passes.matmulnbits`` then rewrites.

transformers' MoE experts (``transformers.grouped_mm_fallback``: rows sorted by expert, a bank
of weights, cumulative row counts) have no torch.onnx translation of their own; ``_grouped_mm``
is ours: one MatMul per expert over every row, each row keeping its own expert's product (E
times the work of the routed rows: a portable fallback; the fused decoder uses QMoE).

"""
from __future__ import annotations

import re
import warnings

import onnx_ir as ir
import torch

from awq_graph.core.errors import ExportError
from awq_graph.core.ir import GraphModel



def custom_translations() -> dict:
    """ONNX translations of custom ops the exported graphs use, by OpOverload."""
    grouped = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    return {grouped.default: _grouped_mm} if grouped is not None else {}


def _grouped_mm(x, weight, offsets):
    """y[r] = x[r] @ weight[e(r)] with e(r) the expert whose rows [offsets[e-1], offsets[e])
    hold r. x (S, in), weight (E, in, out), offsets (E,). Traced once, E unrolled."""
    from onnxscript import opset18 as op

    rows = op.Range(op.Constant(value_int=0), op.Gather(op.Shape(x), op.Constant(value_int=0), axis=0),
                    op.Constant(value_int=1))
    ends = op.Cast(offsets, to=ir.DataType.INT64)
    start, out = op.Constant(value_int=0), None
    for e in range(weight.shape[0]):
        end = op.Gather(ends, op.Constant(value_int=e), axis=0)
        y = op.MatMul(x, op.Gather(weight, op.Constant(value_int=e), axis=0))
        mine = op.Unsqueeze(op.And(op.GreaterOrEqual(rows, start), op.Less(rows, end)), op.Constant(value_ints=[1]))
        out = op.Where(mine, y, op.Mul(y, op.Constant(value_float=0.0)) if out is None else out)
        start = end
    return out


def export_float_onnx(gm: GraphModel) -> ir.Model:
    """torch.onnx (dynamo) export of the program with its current (folded) parameters: dynamic
    in batch and length like the program, or at the length the program's export fixed (the
    runtime then pads shorter sequences on the right: later tokens never reach a causal LM's
    earlier logits)."""
    example = torch.zeros(1, gm.fixed_seq or 8, dtype=torch.long)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(gm.program, (example,), dynamo=True, optimize=False,
                                        external_data=True, verbose=False,
                                        input_names=["input_ids"], output_names=["logits"],
                                        custom_translation_table=custom_translations())
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {onnx_failure(exc)}") from exc
    if gm.fixed_seq:  # torch.onnx names the length as the program's input does; it is this number
        ids = program.model.graph.inputs[0]
        ids.shape = ir.Shape([ids.shape[0], gm.fixed_seq])
    return program.model


def onnx_failure(exc: Exception) -> str:
    """The line of torch.onnx's long report that names the op it could not translate."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    if match:
        return f"no ONNX translation for the op {match.group(1)} (the model's modeling code uses it)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def save_model(model: ir.Model, path) -> None:
    ir.save(model, str(path), external_data=path.name + ".data")
