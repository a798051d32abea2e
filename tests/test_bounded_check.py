"""The check of the written decoder within one layer's memory (issue: scale): the integers leave
memory as each layer is searched (a scratch file, ``awq_graph.core.spill``), every linear's integers
in the written file are compared with the search's digests, and a shallow decoder over the
file's own tensors (the first two layers, the last, the head) is run against the torch program
run through the same layers."""

import onnx
import pytest
import torch

from awq_graph.core.numerics import PackedWeight, QuantScheme
from awq_graph.core.layer_cut import run_layers
from awq_graph.export import export_model
from awq_graph.core.spill import IntegerSpill, SpilledWeight
from awq_graph.emit import check_written_integers

from conftest import tiny_model


def test_the_program_run_through_chosen_layers_is_the_model_with_only_those_layers():
    """The reference of the shallow check, against transformers itself: a 4-layer model run
    through layers 0, 1 and 3 gives the logits of a 3-layer model holding those layers."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(1))
    gm = export_model(model)
    with torch.no_grad():
        assert torch.equal(run_layers(gm, ids, [0, 1, 2, 3]), gm.run(ids))  # every layer: the whole program
        cfg = model.config.to_dict() | {"num_hidden_layers": 3}
        shallow = AutoModelForCausalLM.from_config(type(model.config).from_dict(cfg)).eval()
        state = model.state_dict()
        for name, value in shallow.state_dict().items():
            source = name.replace("layers.2.", "layers.3.")
            value.copy_(state[source])
        expected = shallow(ids).logits
        got = run_layers(gm, ids, [0, 1, 3])
    deviation = float((got - expected).abs().max() / expected.abs().max())
    assert deviation < 1e-5, deviation  # measured 0.0: the same ops in the same order


def _packed(rows: int, cols: int = 64, seed: int = 0) -> PackedWeight:
    from awq_graph.core.numerics import quantize

    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return PackedWeight.of(quantize(w, QuantScheme(4, 32, False)))


def test_spilled_integers_read_back_as_they_were_packed_also_fused(tmp_path):
    spill = IntegerSpill(tmp_path / "spill")
    q, k = _packed(8, seed=1), _packed(4, seed=2)
    sq, sk = spill.put("q", q), spill.put("k", k)
    assert spill.bytes_written == sum(t.numel() * t.element_size() for p in (q, k) for t in (p.blob, p.scales, p.zeros))
    assert torch.equal(sq.dequantize(), q.dequantize())
    fused = SpilledWeight.concat_rows([sq, sk])
    assert torch.equal(fused.packed().blob, PackedWeight.concat_rows([q, k]).blob)
    assert torch.equal(fused.zero, PackedWeight.concat_rows([q, k]).zero)
    spill.close()
    assert not (tmp_path / "spill").exists()


def test_a_compile_holds_no_integers_and_checks_every_linear_of_the_file(tmp_path):
    from awq_graph import compile

    model = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    result = compile(model, ids, tmp_path / "out", n_samples=4, seqlen=32, scheme="uint4_wo_32")
    graph = result.report["graph"]
    assert graph["kind"] == "kv-decoder" and graph["checked_layers"] == [0, 1, 3], graph
    assert graph["integers_checked"] == 4 * 7 + 1 == result.report["quantized_linears"], graph  # the 8-bit head too
    assert graph["float_check_deviation"] < 1e-5, graph  # the shallow graph against torch; measured 2e-7
    # the written level's session ran int8 activations (onnxruntime computes them only with prepacking)
    assert graph["check_deviation"] > 100 * graph["float_check_deviation"], graph
    assert not list((tmp_path / "out").glob("*.spill")) and not list((tmp_path / "out").glob("*check*"))


def test_integers_changed_in_the_written_file_are_named(tmp_path):
    """The digests are taken when the search makes the integers; one flipped byte of the file is
    found and the linear named."""
    from awq_graph.emit import write_onnx
    from awq_graph.search import rtn

    model = tiny_model("llama")
    gm = export_model(model)
    spill = IntegerSpill(tmp_path / "spill")
    quantized = rtn(gm, QuantScheme(4, 32, False), keep=spill.put).quantized
    assert all(isinstance(q, SpilledWeight) for q in quantized.values())
    path = tmp_path / "model.onnx"
    emitted = write_onnx(gm, quantized, path, model=model)
    assert emitted.kind == "kv-decoder"
    proto = onnx.load(str(path), load_external_data=False)
    written = {t.name: ("blob", quantized["model.layers.1.mlp.down_proj"]) for t in proto.graph.initializer
               if t.name == "model.layers.1.mlp.down_proj.qweight"}
    assert check_written_integers(path, written) == 1
    tensor = next(t for t in proto.graph.initializer if t.name == "model.layers.1.mlp.down_proj.qweight")
    offset = int({e.key: e.value for e in tensor.external_data}["offset"])
    data = bytearray((tmp_path / "model.onnx.data").read_bytes())
    data[offset + 5] ^= 0x10
    (tmp_path / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="blob of 'model.layers.1.mlp.down_proj'"):
        check_written_integers(path, written)
    spill.close()


def test_spilled_and_held_integers_write_the_same_file(tmp_path):
    from awq_graph.emit import write_onnx
    from awq_graph.search import rtn

    model = tiny_model("qwen2")
    gm = export_model(model)
    scheme = QuantScheme(4, 32, False)
    spill = IntegerSpill(tmp_path / "spill")
    for name, keep in (("held", None), ("spilled", spill.put)):
        (tmp_path / name).mkdir()
        write_onnx(gm, rtn(gm, scheme, keep=keep).quantized, tmp_path / name / "model.onnx", model=model)
    for file in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "held" / file).read_bytes() == (tmp_path / "spilled" / file).read_bytes(), file
    spill.close()


@pytest.mark.parametrize("model_type, overrides, layers", [
    ("llama", {"num_hidden_layers": 5}, [0, 1, 4]),
    # the first global layer too: its attention is another kind
    ("gemma3_text", {"num_hidden_layers": 6, "sliding_window": 5,
                     "layer_types": ["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 2},
     [0, 1, 3, 5]),
    # a dense layer 0 before MoE layers: the layers are not one program, so every one is checked
    ("qwen3_moe", {"num_hidden_layers": 4, "mlp_only_layers": [0]}, [0, 1, 2, 3]),
])
def test_the_check_runs_the_first_two_layers_the_last_and_each_kind(model_type, overrides, layers):
    from awq_graph.emit import checked_layers
    from awq_graph.load import tiny_random_model

    model = tiny_random_model(model_type, **overrides)
    assert checked_layers(export_model(model), model) == layers
