"""The Python API: in-memory models and token tensors in, a compiled folder out."""
import json

import pytest

import torch
from torch import nn
from transformers import LlamaConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

import awq_graph
from awq_graph import runtime

from conftest import tiny_model


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


class _Inner(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([_Block(cfg.hidden_size) for _ in range(cfg.num_hidden_layers)])


class NoNormLM(PreTrainedModel):
    """No norms and GELU between the linears: nothing can carry a scale."""
    config_class = LlamaConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.model = _Inner(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids, use_cache=False, **kwargs):
        x = self.model.embed_tokens(input_ids)
        for block in self.model.layers:
            x = block(x)
        return CausalLMOutput(logits=self.lm_head(x))


def test_api_takes_a_model_and_token_tensors_and_names_its_files(tmp_path):
    model = tiny_model()
    calib = [torch.randint(0, 320, (64,), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = awq_graph.compile(model, calib, tmp_path / "out", scheme="uint4_wo_16", n_samples=6, seqlen=64)
    assert {p.name for p in result.files} >= {"model.onnx", "model.onnx.data", "awq_config.json", "report.json"}
    assert result.report["calibration"] == {"samples": 6, "seqlen": 64}
    assert result.report["warnings"] == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # caller's model untouched


def test_an_architecture_with_nothing_to_scale_still_compiles_with_a_warning(tmp_path):
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=64)
    model = NoNormLM(cfg).eval()
    calib = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    result = awq_graph.compile(model, calib, tmp_path / "out", scheme="uint4_wo_16", n_samples=4, seqlen=32)
    report = result.report
    assert report["groups"] == [] and report["quantized_linears"] == 4
    assert len(report["warnings"]) == 1 and "plain RTN and clipping" in report["warnings"][0]
    assert "gelu" in report["warnings"][0] or "embedding" in report["warnings"][0]
    assert any(c["clipped"] for c in report["clipping"])
    ids = torch.randint(0, 64, (1, 10))
    got = runtime.onnx_logits(runtime.session(tmp_path / "out"))(ids)
    with torch.no_grad():
        ref = model(ids).logits
    assert float((got - ref).norm() / ref.norm()) < 0.2  # int4 of a random model: measured ~0.05
    assert json.loads((tmp_path / "out" / "awq_config.json").read_text())["scaling_layers"] == []


class DataDependentLM(NoNormLM):
    """Python control flow on tensor values: torch.export cannot capture it."""

    def forward(self, input_ids, use_cache=False, **kwargs):
        x = self.model.embed_tokens(input_ids)
        if float(x.sum()) > 0:  # a branch on data
            x = x * 2
        return CausalLMOutput(logits=self.lm_head(x))


def test_a_model_torch_export_cannot_capture_is_a_clear_error(tmp_path):
    model = DataDependentLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=64)).eval()
    with pytest.raises(awq_graph.ExportError, match="torch.export could not capture DataDependentLM: .*--config does not help"):
        awq_graph.compile(model, torch.randint(0, 64, (2, 16)), tmp_path / "out", n_samples=2, seqlen=16)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tied", [False, True])
def test_quantize_lm_head_emits_one_more_matmulnbits(tmp_path, tied):
    import onnx

    model = tiny_model(tie_word_embeddings=tied)
    calib = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    plain = awq_graph.compile(model, calib, tmp_path / "plain", scheme="uint4_wo_16", n_samples=2, seqlen=32)
    head = awq_graph.compile(model, calib, tmp_path / "head", scheme="uint4_wo_16", n_samples=2, seqlen=32,
                             quantize_lm_head=True)
    assert head.report["quantized_linears"] == plain.report["quantized_linears"] + 1
    ops = [n.op_type for n in onnx.load(tmp_path / "head" / "model.onnx", load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == 15 and "Gather" in ops  # the embedding lookup stays float
    table = 320 * 64 * 4  # float32 bytes of the (vocab, hidden) head / embedding table
    if tied:  # the float table stays for the lookup; the int4 head is an extra ~1/6 of it
        assert 0 < head.report["onnx_bytes"] - plain.report["onnx_bytes"] < table / 4
    else:  # the float head goes, its int4 form comes
        assert plain.report["onnx_bytes"] - head.report["onnx_bytes"] > table / 2
    ids = torch.randint(0, 320, (1, 12))
    got = runtime.onnx_logits(runtime.session(tmp_path / "head"))(ids)
    with torch.no_grad():
        ref = model(ids).logits
    assert float((got - ref).norm() / ref.norm()) < 0.2  # int4 of a random model: measured ~0.07
