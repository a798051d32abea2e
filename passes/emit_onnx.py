"""Emit: the folded float graph to ONNX, then every quantized linear to one MatMulNBits.

Rewrite (per quantized linear with weight W, integers q, scales, zero points):

    MatMul(x, Transpose(W))            ->  com.microsoft::MatMulNBits(x, B, scales[, zp])
    Gemm(x, W, transB=1) / + bias      ->  MatMulNBits(x, B, scales, zp, bias)

B, scales and zp are packed by ``awq_graph.numerics.pack_matmulnbits`` from the exact
integers the search chose. W's float initializer is removed.
"""
from __future__ import annotations

import logging
import re
import warnings

import numpy as np
import onnx_ir as ir
import torch

from awq_graph.graph import GraphModel
from awq_graph.numerics import QuantizedWeight, pack_matmulnbits
from awq_graph.errors import ExportError

log = logging.getLogger(__name__)
_PREFIX = "lm."


def export_float_onnx(gm: GraphModel) -> ir.Model:
    """torch.onnx (dynamo) export of the program with its current (folded) parameters."""
    example = torch.randint(0, 2, (1, 8))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(gm.program, (example,), dynamo=True, optimize=False,
                                        external_data=True, verbose=False,
                                        input_names=["input_ids"], output_names=["logits"])
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {_onnx_failure(exc)}") from exc
    return program.model


def _onnx_failure(exc: Exception) -> str:
    """The line of torch.onnx's long report that names the op it could not translate."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    if match:
        return f"no ONNX translation for the op {match.group(1)} (the model's modeling code uses it)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _initializer(graph: ir.Graph, param: str) -> ir.Value | None:
    return graph.initializers.get(_PREFIX + param) or graph.initializers.get(param)


def rewrite_matmulnbits(model: ir.Model, weights: dict[str, QuantizedWeight],
                        weight_param: dict[str, str], accuracy_level: int = 0) -> int:
    """Replace each quantized linear's MatMul (or Gemm) with MatMulNBits; returns how many.

    Patterns, by how the exporter wrote the linear:
      1. MatMul(x, Transpose(W))        W stored (out, in): aten.linear
      2. MatMul(x, W)                   W stored (in, out): Conv1D's addmm
      3. Gemm(x, W, bias, transB=0|1)   either layout; the bias moves into MatMulNBits
    """
    graph = model.graph
    count = 0
    for layer, qw in weights.items():
        w_value = _initializer(graph, weight_param[layer])
        if w_value is None:
            raise ExportError(f"ONNX graph has no initializer for '{weight_param[layer]}'")
        uses = list(w_value.uses())
        # a tied lm_head shares its table with the embedding lookup, which stays float
        lookups = [u for u in uses if u[0].op_type == "Gather" and u[1] == 0]
        uses = [u for u in uses if u not in lookups]
        if len(uses) != 1:
            raise ExportError(f"'{layer}': its weight has {len(uses)} uses in the ONNX graph, expected 1")
        user, index = uses[0]
        bias = None
        if user.op_type == "Transpose":  # Pattern 1
            mm_uses = list(user.outputs[0].uses())
            if len(mm_uses) != 1 or mm_uses[0][0].op_type != "MatMul" or mm_uses[0][1] != 1:
                raise ExportError(f"'{layer}': the transposed weight does not feed one MatMul")
            target, dead = mm_uses[0][0], [mm_uses[0][0], user]
        elif user.op_type == "MatMul" and index == 1:  # Pattern 2
            target, dead = user, [user]
        elif user.op_type == "Gemm" and index == 1:  # Pattern 3
            attrs = {k: a.value for k, a in user.attributes.items()}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                raise ExportError(f"'{layer}': Gemm with transA/alpha/beta is not rewritten")
            target, dead = user, [user]
            bias = user.inputs[2] if len(user.inputs) > 2 else None
        else:
            raise ExportError(f"'{layer}': its weight feeds {user.op_type}, not a MatMul or Gemm")
        n, k = qw.q.shape
        b, scales, zp = pack_matmulnbits(qw)
        base = weight_param[layer].removesuffix(".weight")
        inputs = [target.inputs[0],
                  _add_initializer(graph, f"{base}.qweight", b),
                  _add_initializer(graph, f"{base}.scales", scales.astype(np.float32)),
                  _add_initializer(graph, f"{base}.qzeros", zp) if zp is not None else None]
        if bias is not None:
            inputs += [None, bias]
        while inputs[-1] is None:
            inputs.pop()
        node = ir.node("MatMulNBits", inputs=inputs, domain="com.microsoft",
                       attributes={"K": k, "N": n, "bits": qw.scheme.bits, "block_size": qw.scheme.group_size,
                                   "accuracy_level": accuracy_level},
                       name=f"{base}.MatMulNBits")
        graph.insert_before(target, node)
        out = target.outputs[0]
        is_output = out in graph.outputs
        ir.convenience.replace_all_uses_with(out, node.outputs[0], replace_graph_outputs=is_output)
        if is_output:  # keep the graph output's name ("logits")
            name, out.name = out.name, None
            node.outputs[0].name = name
        else:
            node.outputs[0].name = f"{base}.out"
        graph.remove(dead, safe=True)
        if not lookups:
            del graph.initializers[w_value.name]
        count += 1
    model.opset_imports.setdefault("com.microsoft", 1)
    return count


def _add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name),
                     shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    graph.register_initializer(value)
    return value


def save_model(model: ir.Model, path) -> None:
    ir.save(model, str(path), external_data=path.name + ".data")
