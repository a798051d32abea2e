"""The ONNX builder both decoder writers share (onnx_ir): nodes and initializers named after the
HF modules they come from, one MatMulNBits (``awq_graph.passes.matmulnbits.matmulnbits_node``)
or float MatMul per linear, the token lookup, the head, and the graph signature of the
KV-cache decoder (see ``awq_graph.emit.decoder``)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from awq_graph.core import cache_names
from awq_graph.core.ir import StreamedParams
from awq_graph.core.numerics import PackedWeight, QuantizedWeight, pack_matmulnbits
from awq_graph.emit.families import DecoderShape
from awq_graph.passes.matmulnbits import initializer, matmulnbits_node, matmulnbits_weights, spilled_initializer
from awq_graph.core.spill import SpilledWeight
from awq_graph.head_table import TokenTable

OPSETS = {"": 21, "com.microsoft": 1}


def tensor_input(name: str, dtype: ir.DataType, shape: list) -> ir.Value:
    """A graph input (or an output's declared type): ``shape`` entries are ints or symbolic names."""
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))


class GraphBuilder:
    """An onnx_ir graph built node by node; values are referred to by name (the HF module they
    come from), so block builders read as lists of ops."""

    def __init__(self, float_type: ir.DataType, inputs: list[ir.Value] = (), name: str = "awq_graph"):
        self.float_type = float_type  # ir.DataType.FLOAT or FLOAT16
        self.np_float = float_type.numpy()
        self.graph = ir.Graph(list(inputs), [], nodes=[], opset_imports=dict(OPSETS), name=name)
        self.values: dict[str, ir.Value] = {v.name: v for v in inputs}

    def value(self, name: str) -> ir.Value:
        return self.values[name]

    def const(self, name: str, array: np.ndarray) -> str:
        array = np.asarray(array)
        value = initializer(array if array.flags.c_contiguous else array.copy(order="C"), name)  # 0-d stays 0-d
        self.graph.register_initializer(value)
        self.values[name] = value
        return name

    def floats(self, name: str, tensor) -> str:
        array = tensor.detach().float().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
        return self.const(name, array.astype(self.np_float, copy=False))  # float32 in, float32 out: the tensor's own memory

    def lazy_floats(self, name: str, matrix: "LazyMatrix", transposed: bool = False) -> str:
        """An initializer of ``matrix`` (or its transpose) whose values are read when the model is
        saved; a transposed one is written a block of columns at a time (no transposed copy)."""
        kind = _TransposedLazy if transposed else _Lazy
        tensor = kind(matrix, self.float_type, name)
        value = ir.Value(name=name, const_value=tensor, shape=tensor.shape, type=ir.TensorType(self.float_type))
        self.graph.register_initializer(value)
        self.values[name] = value
        return name

    def nbits_weights(self, qw, name: str) -> list[str]:
        """The MatMulNBits initializers of ``qw`` under ``name`` (made and registered once: a tied
        head's are read by the token lookup too)."""
        if f"{name}.qweight" not in self.values:
            for value in matmulnbits_weights(qw, name, scale_dtype=self.np_float):
                self.graph.register_initializer(value)
                self.values[value.name] = value
        return [n for n in (f"{name}.qweight", f"{name}.scales", f"{name}.qzeros") if n in self.values]

    def nbits_bank(self, qw, name: str, experts: int, rows=None) -> list[str | None]:
        """QMoE's (weights, scales, zero points or None) of a bank of ``experts`` whose
        (E * out, in) integers go expert by expert (``rows``: the rows taken first, in this
        order): MatMulNBits' packing, one (out, ...) slab per expert. Spilled integers are read
        from the scratch file when the model is saved, a bank at a time."""
        slab = (experts, qw.shape[0] // experts)
        if not isinstance(qw, SpilledWeight):
            blob, scales, zeros = pack_matmulnbits(qw if rows is None else qw.take_rows(rows))
            return [self.const(f"{name}.qweight", blob.reshape(*slab, -1)),
                    self.const(f"{name}.scales", scales.reshape(*slab, -1).astype(self.np_float)),
                    None if zeros is None else self.const(f"{name}.qzeros", zeros.reshape(*slab, -1))]
        out = []
        for kind, suffix, dtype in (("blob", "qweight", None), ("scales", "scales", self.np_float), ("zeros", "qzeros", None)):
            if kind not in qw.segments[0].where:
                out.append(None)
                continue
            count = sum(int(np.prod(s.where[kind][2])) for s in qw.segments)
            value = spilled_initializer(qw, kind, f"{name}.{suffix}", dtype, rows, (*slab, count // qw.shape[0]))
            self.graph.register_initializer(value)
            self.values[value.name] = value
            out.append(value.name)
        return out

    def add(self, node: ir.Node, outputs: list[str]) -> None:
        """Append ``node``, naming its outputs (an empty name: an optional output left unused)."""
        self.graph.append(node)
        for value, out in zip(node.outputs, outputs):
            value.name = out
            if out:
                self.values[out] = value

    def op(self, op_type: str, inputs: list, name: str, outputs: int | list = 1, domain: str = "", **attrs):
        outs = [f"{name}/out{k}" for k in range(outputs)] if isinstance(outputs, int) else outputs
        node = ir.node(op_type, [self.values[i] if i else None for i in inputs], attributes=attrs, domain=domain,
                       name=name, num_outputs=len(outs))
        self.add(node, outs)
        return outs[0] if len(outs) == 1 else outs

    def model(self, outputs: list[ir.Value]) -> ir.Model:
        """The model whose graph outputs are the values named like ``outputs`` (typed as they are)."""
        for declared in outputs:
            value = self.values[declared.name]
            value.type, value.shape = declared.type, declared.shape
            self.graph.outputs.append(value)
        return ir.Model(self.graph, ir_version=10, producer_name="awq-graph")


@dataclass(frozen=True)
class GraphFacts:
    """What the exported graph says that a decoder writer needs (``awq_graph.emit.graph_facts``)."""

    layers: str  # the decoder layers' module list: "model.layers"
    head: str  # the linear that writes the logits
    embedding: str  # the module of the token lookup: "model.embed_tokens"
    table: str  # the parameter it reads (a tied table may carry the head's name: "lm_head.weight")
    tied_head: bool  # the head reads the token table's placeholder
    norm_offsets: dict[str, float]  # norm weight parameter -> the constant its norm adds to it (x * (1 + w): 1)

    def layer(self, i: int) -> str:
        return f"{self.layers}.{i}"

    def norm_factor(self, params: dict[str, torch.Tensor], module: str) -> torch.Tensor:
        """What the norm ``module`` multiplies by: its weight plus the graph's offset."""
        name = f"{module}.weight"
        if name not in self.norm_offsets:
            raise ValueError(f"'{name}' is not the weight of a norm in the exported graph")
        return params[name].detach().float() + self.norm_offsets[name]


@dataclass
class LinearWeights:
    """What one (possibly fused) linear needs: its integers, or its float matrix (out, in)."""

    quantized: QuantizedWeight | None
    matrix: "torch.Tensor | LazyMatrix | None"
    bias: torch.Tensor | None = None

    @staticmethod
    def concat(parts: list["LinearWeights"]) -> "LinearWeights":
        """Rows of several linears that read the same input, as one linear."""
        biases = [p.bias for p in parts]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else torch.zeros(out_rows(p)) for b, p in zip(biases, parts)])
        if all(p.quantized is not None for p in parts) and len({p.quantized.scheme for p in parts}) == 1:
            q = [p.quantized for p in parts]
            for kind in (SpilledWeight, PackedWeight):  # no unpacking (spilled: nothing read yet)
                if all(isinstance(x, kind) for x in q) and len({x.shape[1] for x in q}) == 1:
                    return LinearWeights(kind.concat_rows(q), None, bias)
            return LinearWeights(QuantizedWeight.concat_rows(q), None, bias)
        matrices = [p.quantized.dequantize() if p.quantized is not None else float_matrix(p.matrix) for p in parts]
        return LinearWeights(None, torch.cat(matrices), bias)


class _Lazy(ir.LazyTensor):
    """A LazyMatrix's values in ``dtype``, read when written (never cached)."""

    def __init__(self, matrix: "LazyMatrix", dtype: ir.DataType, name: str, shape=None):
        self.matrix, self.np_float = matrix, dtype.numpy()
        super().__init__(self._evaluate_array, dtype, ir.Shape(shape or matrix.shape), name=name)

    def _values(self) -> np.ndarray:
        return self.matrix.read().detach().float().numpy()

    def _evaluate_array(self):
        return ir.tensor(np.ascontiguousarray(self._values().astype(self.np_float, copy=False)), name=self.name)


class _TransposedLazy(_Lazy):
    """W^T of a LazyMatrix W (out, in): a MatMul's (in, out) operand."""

    def __init__(self, matrix: "LazyMatrix", dtype: ir.DataType, name: str):
        super().__init__(matrix, dtype, name, shape=matrix.shape[::-1])

    def _evaluate_array(self):
        return ir.tensor(np.ascontiguousarray(self._values().T.astype(self.np_float, copy=False)), name=self.name)

    def tofile(self, file) -> None:
        w = self._values()
        step = max(1, (16 << 20) // (4 * w.shape[0]))  # 16 MB of columns at a time
        for start in range(0, w.shape[1], step):
            np.ascontiguousarray(w[:, start:start + step].T).astype(self.np_float, copy=False).tofile(file)


@dataclass(frozen=True)
class LazyMatrix:
    """A float (out, in) matrix read only when the model is written (a checkpoint's head: 2 GB
    of float32 for Llama-3-8B, never held beside the rest)."""

    shape: tuple[int, int]
    read: Callable[[], torch.Tensor]


def lazy_param(params, name: str) -> LazyMatrix:
    """Parameter ``name`` read when the model is written (a streamed store is not read before)."""
    shape = params.shape_of(name) if isinstance(params, StreamedParams) else params[name].shape
    return LazyMatrix(tuple(shape), lambda: params[name])


def float_matrix(matrix) -> torch.Tensor:
    return matrix.read() if isinstance(matrix, LazyMatrix) else matrix


def out_rows(lw: LinearWeights) -> int:
    return lw.quantized.shape[0] if lw.quantized is not None else lw.matrix.shape[0]


def linear(g: GraphBuilder, x: str, lw: LinearWeights, name: str, accuracy_level: int, tied_table: str | None = None) -> str:
    """x @ W^T (+ b). ``tied_table``: W is this (out, in) initializer already (a tied lm_head
    reads the embedding table; onnxruntime folds the Transpose once at load)."""
    if lw.quantized is None:
        if tied_table is not None:
            w = g.op("Transpose", [tied_table], f"{name}/Transpose", perm=[1, 0])
        elif isinstance(lw.matrix, LazyMatrix):
            w = g.lazy_floats(f"{name}.weight_t", lw.matrix, transposed=True)
        else:
            w = g.floats(f"{name}.weight_t", lw.matrix.T.contiguous())
        y = g.op("MatMul", [x, w], f"{name}/MatMul")
        if lw.bias is not None:
            y = g.op("Add", [y, g.floats(f"{name}.bias", lw.bias)], f"{name}/Add")
        return y
    bias = g.value(g.floats(f"{name}.bias", lw.bias)) if lw.bias is not None else None
    weights = [g.value(n) for n in g.nbits_weights(lw.quantized, name)]
    node, _ = matmulnbits_node(g.value(x), lw.quantized, name, accuracy_level, bias, weights=weights)
    g.add(node, [f"{name}/MatMulNBits/out0"])
    return f"{name}/MatMulNBits/out0"


def embedding(g: GraphBuilder, ids: str, table: "torch.Tensor | LazyMatrix", quantized: TokenTable | None,
              name: str) -> str:
    """The rows of the token table: a Gather over the float table, or GatherBlockQuantized over
    integers (``quantized``, rows = tokens): the table's own, or a tied 4-bit head's initializers
    themselves (reshaped; one copy in the file), times 1 / s per channel when the head's rows were
    scaled by its search."""
    if quantized is None:  # its initializer: what a tied float head reads
        init = g.lazy_floats(f"{name}.weight", table) if isinstance(table, LazyMatrix) else g.floats(f"{name}.weight", table)
        return g.op("Gather", [init, ids], f"{name}/Gather")
    qw, scheme = quantized.quantized, quantized.quantized.scheme
    vocab, hidden = qw.shape
    blocks = -(-hidden // scheme.group_size)
    if quantized.head is not None:  # the head's (N, k_blocks, blob), (N * k_blocks,), (N * zero bytes,)
        shapes = {"qweight": [vocab, -1], "scales": [vocab, blocks], "qzeros": [vocab, -1]}
        inputs = []
        for source in g.nbits_weights(qw, quantized.head):
            kind = source.rsplit(".", 1)[1]
            shape = g.const(f"{name}.{kind}_shape", np.array(shapes[kind], np.int64))
            inputs.append(g.op("Reshape", [source, shape], f"{name}/Reshape_{kind}"))
        inputs.insert(1, ids)
    else:
        packed, scales, zeros = pack_matmulnbits(qw)  # (V, blocks, blob): rows padded to whole blocks
        data = g.const(f"{name}.qweight", packed.reshape(vocab, -1))
        scale = g.const(f"{name}.scales", scales.reshape(vocab, blocks).astype(g.np_float))
        inputs = [data, ids, scale]
        if zeros is not None:
            inputs.append(g.const(f"{name}.qzeros", zeros.reshape(vocab, -1)))
    rows = g.op("GatherBlockQuantized", inputs, f"{name}/GatherBlockQuantized", domain="com.microsoft",
                bits=scheme.bits, block_size=scheme.group_size, gather_axis=0, quantize_axis=1)
    if blocks * scheme.group_size != hidden:
        rows = g.op("Slice", [rows, g.const(f"{name}.start", np.array([0], np.int64)),
                              g.const(f"{name}.end", np.array([hidden], np.int64)),
                              g.const(f"{name}.axes", np.array([2], np.int64))], f"{name}/Slice")
    if quantized.inverse_scale is not None:
        rows = g.op("Mul", [rows, g.floats(f"{name}.inverse_scale", quantized.inverse_scale)], f"{name}/Mul_inverse_scale")
    return rows


def head_reads_table(tied_head: bool, head_quantized: bool, quantized_table) -> bool:
    """A head tied to the token table (a graph fact) reads the embedding's float initializer
    while both stay float, instead of a copy of its own."""
    return tied_head and not head_quantized and quantized_table is None


def head_and_model(g: GraphBuilder, h: str, head: LinearWeights, head_name: str, table_name: str, quantized_table,
                   accuracy_level: int, shape: DecoderShape, tied_head: bool, outputs: list[ir.Value]) -> ir.Model:
    """The head ``head_name`` into the ``logits`` output, then the model around the graph (its
    ``outputs`` as ``signature`` declares them).
    ``tied_head``: the head reads the token table's placeholder (a graph fact); while both stay
    float, it reads the embedding's initializer ``table_name`` instead of a copy."""
    tied = head_reads_table(tied_head, head.quantized is not None, quantized_table)
    logits = linear(g, h, head, head_name, accuracy_level, table_name if tied else None)
    if shape.final_softcap:
        logits = softcap(g, logits, shape.final_softcap, head_name)
    if shape.logits_divisor != 1.0:
        logits = g.op("Div", [logits, g.floats(f"{head_name}.logits_divisor", np.array(shape.logits_divisor))],
                      f"{head_name}/Div")
    value = g.value(logits)
    value.name = "logits"  # the head's last node writes the graph output
    g.values["logits"] = value
    return g.model(outputs)


def softcap(g: GraphBuilder, x: str, cap: float, name: str) -> str:
    c = g.floats(f"{name}.softcap", np.array(cap))
    return g.op("Mul", [g.op("Tanh", [g.op("Div", [x, c], f"{name}/softcap_Div")], f"{name}/softcap_Tanh"), c],
                f"{name}/softcap_Mul")


def attention_lengths(g: GraphBuilder):
    """GroupQueryAttention's seqlens_k (tokens - 1 per row) and total_sequence_length, from the
    attention mask (right-padded batches)."""
    mask_sum = g.op("ReduceSum", ["attention_mask", g.const("axes_1", np.array([1], np.int64))],
                    "attention_mask/ReduceSum", keepdims=0)
    seqlens = g.op("Cast", [g.op("Sub", [mask_sum, g.const("one", np.array(1, np.int64))], "seqlens/Sub")],
                   "seqlens_k", to=int(ir.DataType.INT32))
    total = g.op("Cast", [g.op("Gather", [g.op("Shape", ["attention_mask"], "attention_mask/Shape"),
                                          g.const("index_1", np.array(1, np.int64))], "total/Gather")],
                 "total_sequence_length", to=int(ir.DataType.INT32))
    return seqlens, total


def keep_last(g: GraphBuilder, delta: str, residual: str):
    """The last ``logits_to_keep`` positions of the residual stream (0: all). Generation asks
    for one, which spares the prompt's (S x vocab) head product and its copy. The input has a
    default, 0 (an initializer of its name): runtimes that do not know it (onnxruntime-genai,
    optimum) leave it out and get every position's logits, as they expect."""
    default = g.value("logits_to_keep")
    default.const_value = ir.tensor(np.array(0, np.int64), name="logits_to_keep")
    g.graph.register_initializer(default)
    keep = g.op("Reshape", ["logits_to_keep", g.const("shape_1", np.array([1], np.int64))], "logits_to_keep/Reshape")
    start = g.op("Neg", [keep], "logits_to_keep/Neg")  # -k: the last k positions; -0: all of them
    end = g.const("int64_max", np.array([np.iinfo(np.int64).max], np.int64))
    axis = g.const("axis_1", np.array([1], np.int64))
    return (g.op("Slice", [delta, start, end, axis], "logits_to_keep/Slice_delta"),
            g.op("Slice", [residual, start, end, axis], "logits_to_keep/Slice_residual"))


def signature(shape: DecoderShape, ftype: ir.DataType) -> tuple[list[ir.Value], list[ir.Value]]:
    """Graph inputs and outputs (see ``awq_graph.emit.decoder``)."""
    batch, seq, past, total_len = "batch", "sequence", "past_sequence", "total_sequence"
    int64 = ir.DataType.INT64
    inputs = [tensor_input("input_ids", int64, [batch, seq]), tensor_input("attention_mask", int64, [batch, total_len]),
              tensor_input("position_ids", int64, [batch, seq]), tensor_input("logits_to_keep", int64, [])]
    outputs = [tensor_input("logits", ftype, [batch, "kept_sequence", shape.vocab])]
    for i in range(shape.layers):
        for kind in ("key", "value"):
            inputs.append(tensor_input(cache_names.past(i, kind), ftype, [batch, shape.kv_heads, past, shape.head_dim]))
            outputs.append(tensor_input(cache_names.present(i, kind), ftype, [batch, shape.kv_heads, total_len, shape.head_dim]))
    return inputs, outputs


def save_decoder(model: ir.Model, path) -> None:
    """model.onnx and its external data file (tensors of 1 kB and more) beside it."""
    ir.save(model, str(path), external_data=path.name + ".data", size_threshold_bytes=1024)
