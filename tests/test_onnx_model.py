"""The emitted int4 ONNX model computes what the torch fake-quant model computes."""
import onnx
import pytest
import torch

from awq_graph import runtime
from awq_graph.export import export_model
from awq_graph.core.numerics import QuantScheme
from awq_graph.emit import write_onnx
from awq_graph.search import SearchOptions, awq_search
from awq_graph.passes.check_config import derive_groups

from conftest import tiny_model


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32, False), QuantScheme(4, 16, True)])
def test_int4_onnx_logits_equal_the_fake_quant_torch_model(tmp_path, scheme):
    gm = export_model(tiny_model(hidden_size=80, head_dim=20))  # 80 = 2.5 groups of 32: a short last group
    _, per_layer, _ = derive_groups(gm)
    calib = torch.randint(0, 320, (6, 32), generator=torch.Generator().manual_seed(0))
    result = awq_search(gm, per_layer, calib, SearchOptions(scheme=scheme, loss_tokens=64, chunk_tokens=64))
    assert any(g.ratio is not None for g in result.groups)
    path = tmp_path / "model.onnx"
    emitted = write_onnx(gm, result.quantized, path, kv_cache=False)  # the logits-only torch.onnx graph
    assert emitted.kind == "logits-only" and emitted.quantized_linears == len(result.quantized) == 2 * 7
    graph = onnx.load(path, load_external_data=False).graph
    assert [n.op_type for n in graph.node].count("MatMulNBits") == 14
    # no float copy of a quantized weight is left, and nothing transposes a weight at run time
    initializers = {i.name for i in graph.initializer}
    float_weights = {gm.linears[n].weight for n in result.quantized}
    assert not {name.removeprefix("lm.") for name in initializers} & float_weights
    transposed = {i for n in graph.node if n.op_type == "Transpose" for i in n.input if i in initializers}
    assert transposed == {"lm.lm_head.weight"}  # only the float head's weight
    ids = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(1))
    fake = {gm.linears[n].weight: gm.linears[n].stored(qw.dequantize()) for n, qw in result.quantized.items()}
    with torch.no_grad():
        ref = gm.run(ids, overrides=fake)
    got = runtime.CompiledModel(path).logits(ids)
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 1e-4, rel  # measured ~1e-7: same integers, float32 accumulation order only
    float_rel = float((got - gm.run(ids)).norm() / ref.norm())
    assert float_rel > 1e-3  # and the weights really are quantized
