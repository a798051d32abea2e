"""One MatMulNBits node in onnxruntime against an independent numpy dequantization."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from awq_graph.numerics import QuantScheme, pack_matmulnbits, quantize


def unpack_reference(b, scales, zp, n, k, block, symmetric):
    """Numpy dequantization written from the contrib-op spec, independent of our packer."""
    kb = -(-k // block)
    codes = np.empty((n, kb * block), dtype=np.int64)
    codes[:, 0::2] = (b.reshape(n, -1) & 0x0F)
    codes[:, 1::2] = (b.reshape(n, -1) >> 4)
    if symmetric:
        zeros = np.full((n, kb), 8)
    else:
        zbytes = zp.reshape(n, -1)
        zeros = np.stack([zbytes & 0x0F, zbytes >> 4], axis=2).reshape(n, -1)[:, :kb]
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


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("k", [256, 576, 200])
def test_matmulnbits_equals_numpy_dequantization(symmetric, block, k):
    torch.manual_seed(block + k)
    n = 24
    w = torch.randn(n, k) * torch.linspace(0.1, 3, k)  # uneven columns
    qw = quantize(w, QuantScheme(4, block, symmetric))
    b, scales, zp = pack_matmulnbits(qw)
    assert b.shape == (n, -(-k // block), block // 2) and b.dtype == np.uint8
    w_ref, codes = unpack_reference(b, scales, zp, n, k, block, symmetric)
    assert np.array_equal(codes, qw.q.numpy().astype(np.int64)), "bit layout: low nibble first"
    np.testing.assert_allclose(w_ref, qw.dequantize().numpy(), rtol=1e-6, atol=1e-6)
    a = np.random.default_rng(0).standard_normal((7, k)).astype(np.float32)
    y = single_node_model(n, k, block, b, scales, zp).run(None, {"A": a})[0]
    ref = a.astype(np.float64) @ w_ref.T
    # float32 accumulation over k terms: measured max rel. error ~2e-7 of the output norm
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-5


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k", [256, 200])
def test_8bit_matmulnbits_equals_numpy_dequantization(symmetric, k):
    """8 bits (the lm_head's default): one byte per weight, one byte per zero point."""
    torch.manual_seed(k)
    n, block = 20, 32
    w = torch.randn(n, k) * torch.linspace(0.1, 3, k)
    qw = quantize(w, QuantScheme(8, block, symmetric))
    b, scales, zp = pack_matmulnbits(qw)
    kb = -(-k // block)
    assert b.shape == (n, kb, block)
    codes = b.reshape(n, -1).astype(np.int64)
    zeros = np.full((n, kb), 128) if symmetric else zp.reshape(n, kb).astype(np.int64)
    w_ref = ((codes.reshape(n, kb, block) - zeros[:, :, None]) * scales.reshape(n, kb)[:, :, None]).reshape(n, -1)[:, :k]
    np.testing.assert_allclose(w_ref, qw.dequantize().numpy(), rtol=1e-6, atol=1e-6)
    assert np.abs(w_ref - w.numpy()).max() < 3 * 2 ** -8 * np.abs(w.numpy()).max()  # 8-bit precision
    a = np.random.default_rng(0).standard_normal((5, k)).astype(np.float32)
    y = single_node_model(n, k, block, b, scales, zp, bits=8).run(None, {"A": a})[0]
    ref = a.astype(np.float64) @ w_ref.T
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-5


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k", [256, 200])
def test_gatherblockquantized_rows_equal_numpy_dequantization(symmetric, k):
    """The int4 embedding: rows packed as MatMulNBits packs them, looked up by GatherBlockQuantized."""
    from passes.emit_decoder import _embedding, _Graph

    torch.manual_seed(k)
    vocab, block = 40, 32
    table = torch.randn(vocab, k)
    scheme = QuantScheme(4, block, symmetric)
    g = _Graph(TensorProto.FLOAT)
    out = _embedding(g, "ids", table, scheme, quantized=True)
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["B", "S", k])], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[3, 0, 39, 3], [7, 8, 9, 1]], dtype=np.int64)
    rows = sess.run(None, {"ids": ids})[0]
    b, scales, zp = pack_matmulnbits(quantize(table, scheme))
    w_ref, _ = unpack_reference(b, scales, zp, vocab, k, block, symmetric)
    np.testing.assert_allclose(rows, w_ref[ids], rtol=1e-6, atol=1e-6)
    assert np.abs(rows - table.numpy()[ids]).max() < 0.5  # and it is the table, to int4 precision
