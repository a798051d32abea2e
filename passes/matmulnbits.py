"""MatMulNBits over onnx_ir: the one node builder both ONNX writers use, and two passes.

The node (every quantized linear of either graph):

    y = com.microsoft::MatMulNBits(x, B, scales[, zero_points][, , bias])
        K = in, N = out, bits, block_size = the group size, accuracy_level

B, scales and zero_points are packed by ``awq_graph.core.numerics.pack_matmulnbits`` from the
exact integers the search chose, as initializers ``{name}.qweight``, ``{name}.scales`` and
``{name}.qzeros``; the node is ``{name}/MatMulNBits``.

``RewriteMatMulNBits`` (a torch.onnx graph; per quantized linear with weight W):

    1. MatMul(x, Transpose(W))         W stored (out, in): aten.linear
    2. MatMul(x, W)                    W stored (in, out): Conv1D's addmm
    3. Gemm(x, W, bias, transB=0|1)    either layout; the bias moves into MatMulNBits
    4. MatMul(x, Gather(Transpose(W), e)) for each expert e of a bank W (E, out, in)
    ->  MatMulNBits(x, ...) and W's float initializer removed (a tied lm_head keeps the table
        its token lookup reads)

A linear that matches no pattern is left as it was and reported with the reason.

``SetAccuracyLevel``: every MatMulNBits and QMoE at one ``accuracy_level`` (0: float
activations, 4: int8).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from awq_graph.core.ir import PREFIX
from awq_graph.core.numerics import QuantizedWeight, pack_matmulnbits
from awq_graph.core.spill import SpilledWeight

QUANTIZED_OPS = ("MatMulNBits", "QMoE")


def initializer(array: np.ndarray, name: str) -> ir.Value:
    """A graph initializer holding ``array``."""
    return ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                    type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))


SPILLED = "awq_graph.spilled"  # an initializer's Value.meta key: (array kind, SpilledWeight) it was read from


def spilled_initializer(qw: SpilledWeight, kind: str, name: str, dtype: np.dtype | None = None,
                        rows=None, shape: tuple[int, ...] | None = None) -> ir.Value:
    """An initializer whose bytes are read from the integer scratch file only when the model is
    saved (``ir.LazyTensor``, not cached). ``rows``: the output rows to write, in this order (an
    index tensor; None: all, as spilled); ``shape``: the array's shape (default: as spilled).
    ``Value.meta[SPILLED]`` says where the bytes came from, when they are the spilled bytes in
    their order (not for taken rows: those are checked by running the model)."""
    first = qw.segments[0].where[kind]
    dtype = np.dtype(dtype or first[1])
    shape = shape or (sum(s.where[kind][2][0] for s in qw.segments), *first[2][1:])

    def read():
        array = qw.array(kind).astype(dtype, copy=False)
        if rows is not None:
            array = array.reshape(qw.shape[0], -1)[np.asarray(rows)]
        return ir.tensor(np.ascontiguousarray(array.reshape(shape)), name=name)

    value = ir.Value(name=name, const_value=ir.LazyTensor(read, ir.DataType.from_numpy(dtype), ir.Shape(shape), name=name),
                     shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.from_numpy(dtype)))
    if rows is None:
        value.meta[SPILLED] = (kind, qw)
    return value


def matmulnbits_weights(qw: QuantizedWeight, name: str, scale_dtype=np.float32) -> list[ir.Value]:
    """The initializers a MatMulNBits of ``qw`` reads: ``{name}.qweight`` (N, k_blocks, blob),
    ``.scales`` (N * k_blocks,) in ``scale_dtype``, and ``.qzeros`` for an asymmetric scheme."""
    if isinstance(qw, SpilledWeight):  # read from the scratch file when the data file is written
        weights = [spilled_initializer(qw, "blob", f"{name}.qweight"),
                   spilled_initializer(qw, "scales", f"{name}.scales", np.dtype(scale_dtype))]
        if "zeros" in qw.segments[0].where:
            weights.append(spilled_initializer(qw, "zeros", f"{name}.qzeros"))
        return weights
    packed, scales, zeros = pack_matmulnbits(qw)
    weights = [initializer(packed, f"{name}.qweight"), initializer(scales.astype(scale_dtype), f"{name}.scales")]
    if zeros is not None:
        weights.append(initializer(zeros, f"{name}.qzeros"))
    return weights


def matmulnbits_node(x: ir.Value, qw: QuantizedWeight, name: str, accuracy_level: int,
                     bias: ir.Value | None = None, scale_dtype=np.float32,
                     weights: list[ir.Value] | None = None) -> tuple[ir.Node, list[ir.Value]]:
    """x @ dequantize(qw)^T (+ bias) as one MatMulNBits node, and the initializers it reads
    (scales in ``scale_dtype``, the activations' type; ``weights``: made already)."""
    n, k = qw.shape
    weights = weights if weights is not None else matmulnbits_weights(qw, name, scale_dtype)
    inputs = list(weights) + [None] * (3 - len(weights))
    if bias is not None:
        inputs += [None, bias]  # after g_idx
    while inputs[-1] is None:
        inputs.pop()
    node = ir.node("MatMulNBits", [x, *inputs], domain="com.microsoft", name=f"{name}/MatMulNBits",
                   attributes={"K": k, "N": n, "bits": qw.scheme.bits, "block_size": qw.scheme.group_size,
                               "accuracy_level": accuracy_level})
    return node, weights


@dataclass
class MatMulNBitsResult(ir.passes.PassResult):
    rewritten: list[str] = field(default_factory=list)  # module names, in the order given
    unmatched: dict[str, str] = field(default_factory=dict)  # module name -> why it was left as it was


class RewriteMatMulNBits(ir.passes.InPlacePass):
    """Patterns 1-4 of the module docstring, for ``weights`` (module name -> integers) whose
    float weight is the parameter ``weight_param[name]``."""

    def __init__(self, weights: dict[str, QuantizedWeight], weight_param: dict[str, str], accuracy_level: int = 0):
        super().__init__()
        self.weights, self.weight_param, self.accuracy_level = weights, weight_param, accuracy_level

    def call(self, model: ir.Model) -> MatMulNBitsResult:
        graph = model.graph
        result = MatMulNBitsResult(model, False)
        for layer, qw in self.weights.items():
            param = self.weight_param[layer]
            w_value = graph.initializers.get(PREFIX + param) or graph.initializers.get(param)
            if w_value is None:
                result.unmatched[layer] = f"the ONNX graph has no initializer for '{param}'"
                continue
            base = param.removesuffix(".weight")
            uses = list(w_value.uses())
            # a tied lm_head shares its table with the embedding lookup, which stays float
            lookups = [u for u in uses if u[0].op_type == "Gather" and u[1] == 0 and len(w_value.shape) == 2]
            uses = [u for u in uses if u not in lookups]
            if len(uses) != 1:
                result.unmatched[layer] = f"its weight has {len(uses)} uses in the ONNX graph, expected 1"
                continue
            user, index = uses[0]
            if len(w_value.shape) == 3:
                matched = _bank_pattern(user)
                if isinstance(matched, str):
                    result.unmatched[layer] = matched
                    continue
                out_f = int(w_value.shape[1])
                for e, (gather, matmul) in matched.items():
                    _replace(graph, matmul, qw.take_rows(slice(e * out_f, (e + 1) * out_f)), f"{base}.{e}", None,
                             self.accuracy_level)
                    index_value = gather.inputs[1]
                    graph.remove([matmul, gather], safe=True)
                    constant = index_value.producer()
                    if constant is not None and constant.op_type == "Constant" and not list(index_value.uses()):
                        graph.remove(constant, safe=True)
                graph.remove(user, safe=True)
            else:
                matched = _linear_pattern(user, index)
                if isinstance(matched, str):
                    result.unmatched[layer] = matched
                    continue
                target, dead, bias = matched
                _replace(graph, target, qw, base, bias, self.accuracy_level)
                graph.remove(dead, safe=True)
            if not lookups:
                del graph.initializers[w_value.name]
            result.rewritten.append(layer)
        if result.rewritten:
            model.opset_imports.setdefault("com.microsoft", 1)
            result.modified = True
        return result


def _linear_pattern(user: ir.Node, index: int):
    """(the MatMul or Gemm to replace, the nodes that go with it, the bias) of patterns 1-3,
    or why none matches."""
    if user.op_type == "Transpose":  # Pattern 1
        mm_uses = list(user.outputs[0].uses())
        if len(mm_uses) != 1 or mm_uses[0][0].op_type != "MatMul" or mm_uses[0][1] != 1:
            return "the transposed weight does not feed one MatMul"
        return mm_uses[0][0], [mm_uses[0][0], user], None
    if user.op_type == "MatMul" and index == 1:  # Pattern 2
        return user, [user], None
    if user.op_type == "Gemm" and index == 1:  # Pattern 3
        attrs = {k: a.value for k, a in user.attributes.items()}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return "its Gemm has transA, alpha or beta"
        return user, [user], user.inputs[2] if len(user.inputs) > 2 else None
    return f"its weight feeds {user.op_type}, not a MatMul or Gemm"


def _bank_pattern(user: ir.Node):
    """Pattern 4: expert index -> (its Gather, its MatMul), or why the bank does not match."""
    perm = user.attributes.get("perm")
    if user.op_type != "Transpose" or perm is None or list(perm.value) != [0, 2, 1]:
        return "the bank of experts does not feed a Transpose(perm=[0, 2, 1])"
    experts = {}
    for gather, _ in user.outputs[0].uses():
        index = ir.convenience.get_const_tensor(gather.inputs[1]) if gather.op_type == "Gather" else None
        mm_uses = list(gather.outputs[0].uses()) if index is not None else []
        if len(mm_uses) != 1 or mm_uses[0][0].op_type != "MatMul" or mm_uses[0][1] != 1:
            return "an expert's weight does not feed one MatMul"
        experts[int(index.numpy())] = (gather, mm_uses[0][0])
    return experts


def _replace(graph: ir.Graph, target: ir.Node, qw: QuantizedWeight, base: str, bias, accuracy_level: int) -> None:
    """MatMulNBits(target's x, the packed integers) in place of ``target``'s output."""
    node, weights = matmulnbits_node(target.inputs[0], qw, base, accuracy_level, bias)
    for value in weights:
        graph.register_initializer(value)
    graph.insert_before(target, node)
    out = target.outputs[0]
    is_output = out in graph.outputs
    ir.convenience.replace_all_uses_with(out, node.outputs[0], replace_graph_outputs=is_output)
    if is_output:  # keep the graph output's name ("logits")
        name, out.name = out.name, None
        node.outputs[0].name = name
    else:
        node.outputs[0].name = f"{base}.out"


@dataclass
class AccuracyLevelResult(ir.passes.PassResult):
    changed: int = 0  # nodes whose level was another one


class SetAccuracyLevel(ir.passes.InPlacePass):
    """Every MatMulNBits and QMoE at ``level``."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def call(self, model: ir.Model) -> AccuracyLevelResult:
        changed = 0
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type in QUANTIZED_OPS and node.domain == "com.microsoft":
                attr = node.attributes.get("accuracy_level")
                if attr is None or attr.value != self.level:
                    node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", self.level)
                    changed += 1
        return AccuracyLevelResult(model, changed > 0, changed)
