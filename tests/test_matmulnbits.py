"""One MatMulNBits node in onnxruntime against an independent numpy dequantization."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from awq_graph.core.numerics import QuantScheme, pack_matmulnbits, quantize


def unpack_reference(b, scales, zp, n, k, block, symmetric, bits=4):
    """Numpy dequantization written from the contrib-op spec, independent of our packer:
    8 bits are one byte per code; 4 bits two codes a byte, low nibble first."""
    kb = -(-k // block)

    def unpack(data, count):
        data = data.reshape(n, -1).astype(np.int64)
        if bits == 8:
            return data[:, :count]
        codes = np.stack([data & 0x0F, data >> 4], axis=2).reshape(n, -1)
        return codes[:, :count]

    codes = unpack(b, kb * block)
    zeros = np.full((n, kb), 2 ** (bits - 1)) if symmetric else unpack(zp, kb)
    s = scales.reshape(n, kb)
    w = (codes.reshape(n, kb, block) - zeros[:, :, None]) * s[:, :, None]
    return w.reshape(n, -1)[:, :k], codes[:, :k]


def single_node_model(n, k, block, b, scales, zp, bits=4):
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")]
    inputs = ["A", "B", "scales"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [4, 8])  # 8: the lm_head's default
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("k", [256, 576, 200])
def test_matmulnbits_equals_numpy_dequantization(bits, symmetric, block, k):
    torch.manual_seed(block + k)
    n = 24
    w = torch.randn(n, k) * torch.linspace(0.1, 3, k)  # uneven columns
    qw = quantize(w, QuantScheme(bits, block, symmetric))
    b, scales, zp = pack_matmulnbits(qw)
    assert b.shape == (n, -(-k // block), block * bits // 8) and b.dtype == np.uint8
    w_ref, codes = unpack_reference(b, scales, zp, n, k, block, symmetric, bits)
    assert np.array_equal(codes, qw.q.numpy().astype(np.int64)), "bit layout: low nibble first"
    np.testing.assert_allclose(w_ref, qw.dequantize().numpy(), rtol=1e-6, atol=1e-6)
    assert np.abs(w_ref - w.numpy()).max() < 3 * 2 ** -bits * np.abs(w.numpy()).max()  # to the bits' precision
    a = np.random.default_rng(0).standard_normal((7, k)).astype(np.float32)
    y = single_node_model(n, k, block, b, scales, zp, bits).run(None, {"A": a})[0]
    ref = a.astype(np.float64) @ w_ref.T
    # float32 accumulation over k terms: measured max rel. error ~2e-7 of the output norm
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-5


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k", [256, 200])
def test_gatherblockquantized_rows_equal_numpy_dequantization(symmetric, k, shared):
    """The int4 embedding: rows packed as MatMulNBits packs them, looked up by GatherBlockQuantized;
    ``shared``: over a tied head's own MatMulNBits initializers (reshaped), each channel times 1 / s."""
    import onnx_ir as ir

    from awq_graph.emit.builder import GraphBuilder, embedding, tensor_input
    from awq_graph.head_table import TokenTable

    torch.manual_seed(k)
    vocab, block = 40, 32
    table = torch.randn(vocab, k)
    scheme = QuantScheme(4, block, symmetric)
    inverse = torch.empty(k).uniform_(0.5, 2.0) if shared else None
    g = GraphBuilder(ir.DataType.FLOAT, [tensor_input("ids", ir.DataType.INT64, ["B", "S"])])
    out = embedding(g, "ids", table, TokenTable(quantize(table, scheme), "head" if shared else None, inverse), "table")
    model = ir.serde.serialize_model(g.model([tensor_input(out, ir.DataType.FLOAT, ["B", "S", k])]))
    assert {t.name for t in model.graph.initializer} >= ({"head.qweight"} if shared else {"table.qweight"})
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[3, 0, 39, 3], [7, 8, 9, 1]], dtype=np.int64)
    rows = sess.run(None, {"ids": ids})[0]
    b, scales, zp = pack_matmulnbits(quantize(table, scheme))
    w_ref, _ = unpack_reference(b, scales, zp, vocab, k, block, symmetric)
    expected = w_ref[ids] * (inverse.numpy() if shared else 1.0)
    np.testing.assert_allclose(rows, expected, rtol=1e-6, atol=1e-6)
    assert np.abs(rows - table.numpy()[ids] * (inverse.numpy() if shared else 1.0)).max() < 1.0  # the table, to int4


def _linear_graph(w: np.ndarray, feed: str):
    """y = x @ Transpose(W) (``feed`` "MatMul", as torch.onnx writes aten.linear) or y = x + W
    (``feed`` "Add": no pattern of the rewrite), W an initializer named like a parameter."""
    import onnx_ir as ir

    from awq_graph.passes.matmulnbits import initializer

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["M", w.shape[1]]))
    weight = initializer(w, "layer.weight")
    if feed == "MatMul":
        t = ir.node("Transpose", [weight], attributes={"perm": [1, 0]})
        y = ir.node("MatMul", [x, t.outputs[0]])
        nodes = [t, y]
    else:
        y = ir.node("Add", [x, weight])
        nodes = [y]
    y.outputs[0].name = "y"
    y.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [y.outputs[0]], nodes=nodes, initializers=[weight], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def test_the_rewrite_replaces_a_transposed_matmul_by_matmulnbits_of_the_chosen_integers():
    import onnx_ir as ir

    from awq_graph.passes.matmulnbits import RewriteMatMulNBits

    torch.manual_seed(0)
    w = torch.randn(24, 64)
    qw = quantize(w, QuantScheme(4, 32))
    model = _linear_graph(w.numpy(), "MatMul")
    result = RewriteMatMulNBits({"layer": qw}, {"layer": "layer.weight"}, accuracy_level=0)(model)
    assert result.modified and result.rewritten == ["layer"] and result.unmatched == {}
    assert [n.op_type for n in model.graph] == ["MatMulNBits"] and "layer.weight" not in model.graph.initializers
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    b, scales, zp = pack_matmulnbits(qw)
    w_ref, _ = unpack_reference(b, scales, zp, 24, 64, 32, False)
    ref = x.astype(np.float64) @ w_ref.T
    got = session.run(None, {"x": x})[0]
    error = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert error < 1e-5, error  # measured 1.2e-7


def test_a_linear_no_pattern_matches_is_left_as_it_was_with_the_reason():
    from awq_graph.passes.matmulnbits import RewriteMatMulNBits

    w = np.ones((4, 16), np.float32)
    model = _linear_graph(w, "Add")
    result = RewriteMatMulNBits({"layer": quantize(torch.from_numpy(w), QuantScheme(4, 16))},
                                {"layer": "layer.weight"})(model)
    assert not result.modified and result.rewritten == []
    assert result.unmatched == {"layer": "its weight feeds Add, not a MatMul or Gemm"}
    assert [n.op_type for n in model.graph] == ["Add"] and "layer.weight" in model.graph.initializers


def test_set_accuracy_level_reports_the_nodes_it_changed():
    from awq_graph.passes.matmulnbits import RewriteMatMulNBits, SetAccuracyLevel

    model = _linear_graph(np.ones((8, 16), np.float32), "MatMul")
    RewriteMatMulNBits({"layer": quantize(torch.ones(8, 16), QuantScheme(4, 16))}, {"layer": "layer.weight"},
                       accuracy_level=0)(model)
    first, again = SetAccuracyLevel(4)(model), SetAccuracyLevel(4)(model)
    assert (first.modified, first.changed) == (True, 1) and (again.modified, again.changed) == (False, 0)
    assert next(iter(model.graph)).attributes["accuracy_level"].value == 4
