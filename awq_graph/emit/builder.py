"""The ONNX builder both decoder writers share: nodes and initializers named after the HF modules
they come from, one MatMulNBits (or float MatMul) per linear, the token lookup, the head, and
the graph signature of the KV-cache decoder (see ``awq_graph.emit.decoder``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from awq_graph.core.numerics import QuantizedWeight, pack_matmulnbits
from awq_graph.emit.families import DecoderShape


class GraphBuilder:
    """Nodes and initializers, named after the HF modules they come from."""

    def __init__(self, float_type):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.float_type = float_type  # TensorProto.FLOAT or FLOAT16
        self.np_float = np.float16 if float_type == TensorProto.FLOAT16 else np.float32

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def floats(self, name: str, tensor) -> str:
        array = tensor.detach().float().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
        return self.const(name, array.astype(self.np_float))

    def op(self, op_type: str, inputs: list, name: str, outputs: int | list = 1, domain: str = "", **attrs):
        outs = [f"{name}/out{k}" for k in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, [i or "" for i in inputs], outs, name=name,
                                           domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs


@dataclass
class LinearWeights:
    """What one (possibly fused) linear needs: its integers, or its float matrix (out, in)."""

    quantized: QuantizedWeight | None
    matrix: torch.Tensor | None
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
            merged = QuantizedWeight(torch.cat([x.q for x in q]), torch.cat([x.scale for x in q]),
                                     torch.cat([x.zero for x in q]), q[0].scheme)
            return LinearWeights(merged, None, bias)
        matrices = [p.quantized.dequantize() if p.quantized is not None else p.matrix for p in parts]
        return LinearWeights(None, torch.cat(matrices), bias)


def out_rows(lw: LinearWeights) -> int:
    return lw.quantized.q.shape[0] if lw.quantized is not None else lw.matrix.shape[0]


def linear(g: GraphBuilder, x: str, lw: LinearWeights, name: str, accuracy_level: int, tied_table: str | None = None) -> str:
    """x @ W^T (+ b). ``tied_table``: W is this (out, in) initializer already (a tied lm_head
    reads the embedding table; onnxruntime folds the Transpose once at load)."""
    if lw.quantized is None:
        if tied_table is not None:
            w = g.op("Transpose", [tied_table], f"{name}/Transpose", perm=[1, 0])
        else:
            w = g.floats(f"{name}.weight_t", lw.matrix.T.contiguous())
        y = g.op("MatMul", [x, w], f"{name}/MatMul")
        if lw.bias is not None:
            y = g.op("Add", [y, g.floats(f"{name}.bias", lw.bias)], f"{name}/Add")
        return y
    qw = lw.quantized
    n, k = qw.q.shape
    packed, scales, zeros = pack_matmulnbits(qw)
    inputs = [x, g.const(f"{name}.qweight", packed), g.const(f"{name}.scales", scales.astype(g.np_float)),
              g.const(f"{name}.qzeros", zeros) if zeros is not None else None]
    if lw.bias is not None:
        inputs += [None, g.floats(f"{name}.bias", lw.bias)]
    return g.op("MatMulNBits", inputs, f"{name}/MatMulNBits", domain="com.microsoft", K=k, N=n,
                bits=qw.scheme.bits, block_size=qw.scheme.group_size, accuracy_level=accuracy_level)


def embedding(g: GraphBuilder, ids: str, table: torch.Tensor, quantized: QuantizedWeight | None,
              name: str = "model.embed_tokens") -> str:
    """The rows of the token table: a Gather over the float table, or GatherBlockQuantized over
    its integers (``quantized``, rows = tokens)."""
    if quantized is None:
        return g.op("Gather", [g.floats(f"{name}.weight", table), ids], f"{name}/Gather")  # keep the name: see lm_head
    qw, scheme = quantized, quantized.scheme
    vocab, hidden = qw.q.shape
    packed, scales, zeros = pack_matmulnbits(qw)  # (V, blocks, blob): rows padded to whole blocks
    blocks = packed.shape[1]
    data = g.const(f"{name}.qweight", packed.reshape(vocab, -1))
    scale = g.const(f"{name}.scales", scales.reshape(vocab, blocks).astype(g.np_float))
    inputs = [data, ids, scale]
    if zeros is not None:
        inputs.append(g.const(f"{name}.qzeros", zeros.reshape(vocab, -1)))
    rows = g.op("GatherBlockQuantized", inputs, f"{name}/GatherBlockQuantized", domain="com.microsoft",
                bits=scheme.bits, block_size=scheme.group_size, gather_axis=0, quantize_axis=1)
    if blocks * scheme.group_size == hidden:
        return rows
    return g.op("Slice", [rows, g.const(f"{name}.start", np.array([0], np.int64)),
                          g.const(f"{name}.end", np.array([hidden], np.int64)),
                          g.const(f"{name}.axes", np.array([2], np.int64))], f"{name}/Slice")


def head_and_model(g: GraphBuilder, h: str, head: LinearWeights, table_name: str, quantized_table,
                   accuracy_level: int, shape: DecoderShape, graph_name: str, tied_head: bool) -> onnx.ModelProto:
    """lm_head into the ``logits`` output, then the model around the graph. ``tied_head``: the
    head reads the token table's placeholder (a graph fact); while both stay float, it reads the
    embedding's initializer ``table_name`` instead of a copy."""
    tied = tied_head and head.quantized is None and quantized_table is None
    logits = linear(g, h, head, "lm_head", accuracy_level, table_name if tied else None)
    if shape.final_softcap:
        logits = softcap(g, logits, shape.final_softcap, "lm_head")
    if shape.logits_divisor != 1.0:
        logits = g.op("Div", [logits, g.floats("lm_head.logits_divisor", np.array(shape.logits_divisor))], "lm_head/Div")
    g.nodes[-1].output[0] = "logits"  # the head's last node writes the graph output
    inputs, outputs = signature(shape, g.float_type)
    graph = helper.make_graph(g.nodes, graph_name, inputs, outputs, g.initializers)
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                          helper.make_opsetid("com.microsoft", 1)],
                                    producer_name="awq-graph")
    model_proto.ir_version = 10
    return model_proto


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
                   "seqlens_k", to=TensorProto.INT32)
    total = g.op("Cast", [g.op("Gather", [g.op("Shape", ["attention_mask"], "attention_mask/Shape"),
                                          g.const("index_1", np.array(1, np.int64))], "total/Gather")],
                 "total_sequence_length", to=TensorProto.INT32)
    return seqlens, total


def keep_last(g: GraphBuilder, delta: str, residual: str):
    """The last ``logits_to_keep`` positions of the residual stream (0: all). Generation asks
    for one, which spares the prompt's (S x vocab) head product and its copy."""
    keep = g.op("Reshape", ["logits_to_keep", g.const("shape_1", np.array([1], np.int64))], "logits_to_keep/Reshape")
    start = g.op("Neg", [keep], "logits_to_keep/Neg")  # -k: the last k positions; -0: all of them
    end = g.const("int64_max", np.array([np.iinfo(np.int64).max], np.int64))
    axis = g.const("axis_1", np.array([1], np.int64))
    return (g.op("Slice", [delta, start, end, axis], "logits_to_keep/Slice_delta"),
            g.op("Slice", [residual, start, end, axis], "logits_to_keep/Slice_residual"))


def signature(shape: DecoderShape, ftype):
    """Graph inputs and outputs (see the module docstring)."""
    batch, seq, past, total_len = "batch", "sequence", "past_sequence", "total_sequence"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, total_len]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [batch, seq]),
              helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [])]
    outputs = [helper.make_tensor_value_info("logits", ftype, [batch, "kept_sequence", shape.vocab])]
    for i in range(shape.layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", ftype,
                                                        [batch, shape.kv_heads, past, shape.head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", ftype,
                                                         [batch, shape.kv_heads, total_len, shape.head_dim]))
    return inputs, outputs


def set_accuracy_level(model_proto: onnx.ModelProto, level: int) -> None:
    """Every MatMulNBits and QMoE of the graph at ``level`` (0: float activations, 4: int8), in place."""
    for node in model_proto.graph.node:
        if node.op_type in ("MatMulNBits", "QMoE"):
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = level


def save_decoder(model_proto: onnx.ModelProto, path) -> None:
    onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
