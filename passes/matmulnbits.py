"""Rewrite: every quantized linear of a torch.onnx graph to one com.microsoft::MatMulNBits.

Rewrite (per quantized linear with weight W, integers q, scales, zero points):

    MatMul(x, Transpose(W))            ->  com.microsoft::MatMulNBits(x, B, scales[, zp])
    Gemm(x, W, transB=1) / + bias      ->  MatMulNBits(x, B, scales, zp, bias)
    MatMul(x, Gather(Transpose(W), e)) ->  MatMulNBits of expert e's rows (a bank W (E, out, in))

B, scales and zp are packed by ``awq_graph.core.numerics.pack_matmulnbits`` from the exact
integers the search chose. W's float initializer is removed.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from awq_graph.core.errors import ExportError
from awq_graph.core.ir import PREFIX
from awq_graph.core.numerics import QuantizedWeight, pack_matmulnbits


def _initializer(graph: ir.Graph, param: str) -> ir.Value | None:
    return graph.initializers.get(PREFIX + param) or graph.initializers.get(param)


def rewrite_matmulnbits(model: ir.Model, weights: dict[str, QuantizedWeight],
                        weight_param: dict[str, str], accuracy_level: int = 0) -> int:
    """Replace each quantized linear's MatMul (or Gemm) with MatMulNBits; returns how many
    (a bank of experts counts once).

    Patterns, by how the exporter wrote the linear:
      1. MatMul(x, Transpose(W))        W stored (out, in): aten.linear
      2. MatMul(x, W)                   W stored (in, out): Conv1D's addmm
      3. Gemm(x, W, bias, transB=0|1)   either layout; the bias moves into MatMulNBits
      4. MatMul(x, Gather(Transpose(W), e)) for each expert e of a bank W (E, out, in)
    """
    graph = model.graph
    count = 0
    for layer, qw in weights.items():
        w_value = _initializer(graph, weight_param[layer])
        if w_value is None:
            raise ExportError(f"ONNX graph has no initializer for '{weight_param[layer]}'")
        uses = list(w_value.uses())
        # a tied lm_head shares its table with the embedding lookup, which stays float
        lookups = [u for u in uses if u[0].op_type == "Gather" and u[1] == 0 and len(w_value.shape) == 2]
        uses = [u for u in uses if u not in lookups]
        if len(uses) != 1:
            raise ExportError(f"'{layer}': its weight has {len(uses)} uses in the ONNX graph, expected 1")
        user, index = uses[0]
        base = weight_param[layer].removesuffix(".weight")
        if len(w_value.shape) == 3:  # Pattern 4
            _rewrite_bank(graph, layer, user, qw, int(w_value.shape[1]), base, accuracy_level)
        else:
            target, dead, bias = _linear_pattern(layer, user, index)
            _to_matmulnbits(graph, target, qw, base, bias, accuracy_level)
            graph.remove(dead, safe=True)
        if not lookups:
            del graph.initializers[w_value.name]
        count += 1
    model.opset_imports.setdefault("com.microsoft", 1)
    return count


def _linear_pattern(layer: str, user: ir.Node, index: int):
    """(the MatMul or Gemm to replace, the nodes that go with it, the bias) of patterns 1-3."""
    if user.op_type == "Transpose":  # Pattern 1
        mm_uses = list(user.outputs[0].uses())
        if len(mm_uses) != 1 or mm_uses[0][0].op_type != "MatMul" or mm_uses[0][1] != 1:
            raise ExportError(f"'{layer}': the transposed weight does not feed one MatMul")
        return mm_uses[0][0], [mm_uses[0][0], user], None
    if user.op_type == "MatMul" and index == 1:  # Pattern 2
        return user, [user], None
    if user.op_type == "Gemm" and index == 1:  # Pattern 3
        attrs = {k: a.value for k, a in user.attributes.items()}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise ExportError(f"'{layer}': Gemm with transA/alpha/beta is not rewritten")
        return user, [user], user.inputs[2] if len(user.inputs) > 2 else None
    raise ExportError(f"'{layer}': its weight feeds {user.op_type}, not a MatMul or Gemm")


def _rewrite_bank(graph: ir.Graph, layer: str, user: ir.Node, qw: QuantizedWeight, out_f: int, base: str,
                  accuracy_level: int) -> None:
    """Pattern 4: ``_grouped_mm``'s per-expert MatMuls over Gather(Transpose(W), e)."""
    perm = user.attributes.get("perm")
    if user.op_type != "Transpose" or perm is None or list(perm.value) != [0, 2, 1]:
        raise ExportError(f"'{layer}': the bank of experts does not feed a Transpose(perm=[0, 2, 1])")
    gathers = [u for u, _ in user.outputs[0].uses()]
    for gather in gathers:
        index = ir.convenience.get_const_tensor(gather.inputs[1]) if gather.op_type == "Gather" else None
        mm_uses = list(gather.outputs[0].uses()) if index is not None else []
        if len(mm_uses) != 1 or mm_uses[0][0].op_type != "MatMul" or mm_uses[0][1] != 1:
            raise ExportError(f"'{layer}': an expert's weight does not feed one MatMul")
        e = int(index.numpy())
        _to_matmulnbits(graph, mm_uses[0][0], qw.take_rows(slice(e * out_f, (e + 1) * out_f)), f"{base}.{e}", None,
                        accuracy_level)
        index_value = gather.inputs[1]
        graph.remove([mm_uses[0][0], gather], safe=True)
        constant = index_value.producer()
        if constant is not None and constant.op_type == "Constant" and not list(index_value.uses()):
            graph.remove(constant, safe=True)
    graph.remove(user, safe=True)


def _to_matmulnbits(graph: ir.Graph, target: ir.Node, qw: QuantizedWeight, base: str, bias, accuracy_level: int):
    """MatMulNBits(target's x, the packed integers) in place of ``target``'s output."""
    n, k = qw.q.shape
    b, scales, zp = pack_matmulnbits(qw)
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


def _add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name),
                     shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    graph.register_initializer(value)
    return value
