"""`--export-hf DIR` writes the AWQ-scaled model as a compressed-tensors pack-quantized checkpoint with
the integers of model.onnx: transformers (with the compressed-tensors package) loads it and computes
what our int4 ONNX model computes; compressed-tensors' own decompressor reads an asymmetric one to
the same weights. Refusals are one line, before the search."""
import json

import pytest
import torch
from safetensors.torch import load_file

from awq_graph import compile
from awq_graph.core.errors import InputError
from awq_graph.runtime import CompiledModel

from conftest import tiny_model


def _calibration():
    return torch.randint(3, 320, (4, 32), generator=torch.Generator().manual_seed(0))


def _ids():
    return torch.randint(0, 320, (2, 19), generator=torch.Generator().manual_seed(1))


def _tensors(folder):
    tensors = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_transformers_loads_the_symmetric_export_and_computes_what_the_onnx_model_computes(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    out, hf = tmp_path / "out", tmp_path / "hf"
    result = compile(model, _calibration(), out, scheme="int4_wo_32", n_samples=4, seqlen=32, export_hf=hf,
                     quantize_lm_head=False,  # the checkpoint keeps the head float: compare like with like
                     accuracy_level=0)  # float activations in MatMulNBits: the same function, exactly
    exported = result.report["export_hf"]
    assert exported["quantized_linears"] == 14 and exported["ignored"] == ["lm_head"], exported
    config = json.loads((hf / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["config_groups"]["group_0"]["weights"]["symmetric"]
    assert any(g["ratio"] is not None for g in result.report["groups"])  # the scales are folded in
    loaded = AutoModelForCausalLM.from_pretrained(hf).eval()
    ids = _ids()
    with torch.no_grad():
        got = loaded(ids).logits
        float_logits = model(ids).logits
    onnx_logits = CompiledModel(out / "model.onnx").logits(ids)
    rel = _rel(got, onnx_logits)
    print(f"transformers on the export vs our int4 ONNX model: {rel:.2e} (tolerance 1e-4); "
          f"vs the float model {_rel(got, float_logits):.2e}")
    assert rel < 1e-4, rel  # measured 1.4e-7
    assert _rel(got, float_logits) > 1e-3  # the weights are the int4 ones, not the float


def test_compressed_tensors_decompresses_the_asymmetric_export_to_the_onnx_models_weights(tmp_path):
    """The default scheme (uint4, zero points) in compressed-tensors' own reader. (transformers 5.24 with
    compressed-tensors 0.20 does not load any asymmetric pack-quantized checkpoint: it lays out the
    zero point unpacked, then unpacks it; vLLM reads the packed zero points.)"""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from transformers import AutoConfig, AutoModelForCausalLM

    out, hf = tmp_path / "out", tmp_path / "hf"
    model = tiny_model(intermediate_size=96)  # 96 = 3 groups of 32 for down_proj's inputs
    compile(model, _calibration(), out, scheme="uint4_wo_32", n_samples=4, seqlen=32, export_hf=hf, accuracy_level=0,
            quantize_lm_head=False)  # the checkpoint keeps the head float: compare like with like
    config = json.loads((hf / "config.json").read_text())
    group = config.pop("quantization_config")["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    tensors = _tensors(hf)
    state = {}
    for name, value in tensors.items():
        if name.endswith(".weight_packed"):
            prefix = name.removesuffix(".weight_packed")
            module = {key.removeprefix(prefix + "."): tensors[key] for key in tensors if key.startswith(prefix + ".")}
            assert module["weight_zero_point"].shape == (-(-module["weight_shape"][0] // 8), module["weight_scale"].shape[1])
            state[prefix + ".weight"] = PackedQuantizationCompressor.decompress(module, scheme)["weight"]
        elif not name.rsplit(".", 1)[-1].startswith("weight_"):
            state[name] = value
    rebuilt = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).eval()
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # a tied head
    ids = _ids()
    with torch.no_grad():
        got = rebuilt(ids).logits
    rel = _rel(got, CompiledModel(out / "model.onnx").logits(ids))
    print(f"compressed-tensors' decompression vs our int4 ONNX model: {rel:.2e} (tolerance 1e-4)")
    assert rel < 1e-4, rel


def test_a_streamed_bfloat16_checkpoint_exports_what_the_in_memory_compile_exports(tmp_path):
    """A sharded bf16 checkpoint read tensor by tensor gives the same checkpoint, tensor for tensor,
    as the model loaded whole: the integers, the bf16 scales, the folded norms in bf16."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "tools"))
    from random_checkpoint import build

    folder = build(tmp_path / "ck", "tiny", layers=2, shard_bytes=40_000)
    exports = {}
    for stream in (True, False):
        hf = tmp_path / f"hf-{stream}"
        result = compile(folder, _calibration(), tmp_path / f"out-{stream}", n_samples=4, seqlen=32,
                         scheme="uint4_wo_32", stream=stream, export_hf=hf)
        assert result.report["weights"]["streamed"] is stream
        assert result.report["export_hf"]["dtype"] == "bfloat16"
        exports[stream] = _tensors(hf)
    assert exports[True].keys() == exports[False].keys()
    for name, tensor in exports[True].items():
        assert torch.equal(tensor, exports[False][name]), name
    assert exports[True]["model.layers.0.mlp.down_proj.weight_scale"].dtype == torch.bfloat16


@pytest.mark.parametrize("case, fault", [
    ("group", "has 64 inputs, not a whole number of groups of 128"),
    ("head", "a searched 4-bit head"),
    ("inside", "is inside"),
])
def test_what_cannot_be_exported_is_one_line_before_the_search(tmp_path, case, fault):
    out = tmp_path / "out"
    options = {"scheme": "uint4_wo_128" if case == "group" else "uint4_wo_32", "n_samples": 4, "seqlen": 32,
               "export_hf": out / "hf" if case == "inside" else tmp_path / "hf"}
    if case == "head":
        options.update(quantize_lm_head=True, lm_head_bits=4)
    with pytest.raises(InputError, match=fault) as caught:
        compile(tiny_model(), _calibration(), out, progress=lambda *a: pytest.fail("the search started"), **options)
    assert "\n" not in str(caught.value)
    assert not out.exists() and not (tmp_path / "hf").exists()
