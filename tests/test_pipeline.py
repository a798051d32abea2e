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
    calib = [torch.randint(0, 320, (64,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = awq_graph.compile(model, calib, tmp_path / "out", scheme="uint4_wo_16", n_samples=6, seqlen=64)
    assert {p.name for p in result.files} == {"model.onnx", "model.onnx.data", "awq_config.json", "report.json",
                                              "genai_config.json", "config.json", "generation_config.json"}
    assert result.report["calibration"] == {"samples": 6, "seqlen": 64}
    assert result.report["warnings"] == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # caller's model untouched


def test_the_scale_grid_has_the_ratios_asked_for(tmp_path):
    """grid_points=4: each group weighs the identity and the ratios 0, 1/4, 2/4, 3/4, each in
    float32 (the screen off: on a CPU with fast bfloat16 "auto" would screen the subgraphs), and the
    report says so; 0 is refused by name."""
    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    result = awq_graph.compile(tiny_model(), calib, tmp_path / "out", scheme="uint4_wo_16", n_samples=4, seqlen=32,
                               grid_points=4, grid_screen="off")
    groups = result.report["groups"]
    assert result.report["grid_points"] == 4 and len(groups) == 2 * 4  # 2 layers, 4 groups each
    assert all(g["exact_points"] == 5 for g in groups), [g["exact_points"] for g in groups]
    assert {g["ratio"] for g in groups} <= {None, 0.0, 0.25, 0.5, 0.75}
    with pytest.raises(awq_graph.InputError, match="`grid_points=0`: give 1 to 200 ratios"):
        awq_graph.CompileOptions(grid_points=0)


def test_an_architecture_with_nothing_to_scale_still_compiles_with_a_warning(tmp_path):
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=64)
    model = NoNormLM(cfg).eval()
    calib = torch.randint(0, 64, (5, 32), generator=torch.Generator().manual_seed(0))  # one held aside
    result = awq_graph.compile(model, calib, tmp_path / "out", scheme="uint4_wo_16", n_samples=4, seqlen=32)
    report = result.report
    assert report["groups"] == [] and report["quantized_linears"] == 4 + 1  # the head, at 8 bits by default
    rtn_warning, graph_warning = report["warnings"]
    assert "plain RTN and clipping" in rtn_warning and ("gelu" in rtn_warning or "embedding" in rtn_warning)
    assert "logits-only" in graph_warning and "NoNormLM is not transformers' own llama class" in graph_warning
    # clipping changed something: on int4 of random weights a shrunk range wins in some groups
    assert any(c["loss_after"] < 0.99 * c["loss_before"] for c in report["clipping"]), report["clipping"]
    ids = torch.randint(0, 64, (1, 10))
    got = runtime.CompiledModel(tmp_path / "out").logits(ids)
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
    with pytest.raises(awq_graph.ExportError, match="torch.export could not capture DataDependentLM: .*`config` does not help"):
        awq_graph.compile(model, torch.randint(0, 64, (2, 16)), tmp_path / "out", n_samples=2, seqlen=16)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tied", [False, True])
def test_quantize_lm_head_makes_the_head_8bit_and_the_embedding_int4(tmp_path, tied):
    import onnx

    model = tiny_model(tie_word_embeddings=tied)
    calib = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    plain = awq_graph.compile(model, calib, tmp_path / "plain", scheme="uint4_wo_16", n_samples=2, seqlen=32,
                              quantize_lm_head=False)
    head = awq_graph.compile(model, calib, tmp_path / "head", scheme="uint4_wo_16", n_samples=2, seqlen=32,
                             quantize_lm_head=True, table_bits=4, accuracy_level=0)  # float activations: exact
    assert head.report["quantized_linears"] == plain.report["quantized_linears"] + 1
    graph = head.report["graph"]
    assert graph["kind"] == "kv-decoder" and graph["check_deviation"] < 1e-5  # torch with the same integers
    nodes = onnx.load(tmp_path / "head" / "model.onnx", load_external_data=False).graph.node
    assert [n.op_type for n in nodes].count("MatMulNBits") == 2 * 5 + 1  # per layer q|k|v, o, gate, up, down; lm_head
    bits = {n.name.split("/")[0]: next(a.i for a in n.attribute if a.name == "bits")
            for n in nodes if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    assert bits.pop("lm_head") == 8 and bits.pop("model.embed_tokens") == 4 and set(bits.values()) == {4}
    table = 320 * 64 * 4  # float32 bytes of one (vocab, hidden) table
    # plain: one float table when tied (the head reads the embedding's), two when untied;
    # head: 1/4 of a table (8 bits) + 1/8 (4 bits) + scales and zero points
    saved = plain.report["onnx_bytes"] - head.report["onnx_bytes"]
    assert saved > (0.4 if tied else 1.4) * table
    ids = torch.randint(0, 320, (1, 12))
    got = runtime.CompiledModel(tmp_path / "head").logits(ids)
    with torch.no_grad():
        ref = model(ids).logits
    assert float((got - ref).norm() / ref.norm()) < 0.2  # int4 of a random model: measured ~0.07


@pytest.mark.parametrize("tied", [False, True])
def test_an_8bit_token_table_is_gathered_from_its_own_integers_or_the_tied_8bit_heads(tmp_path, tied):
    """table_bits=8: GatherBlockQuantized of 8 bits; tied to the 8-bit head, the head's integers
    are the table's (one copy in the file), checked against torch with the same integers."""
    import onnx

    model = tiny_model(tie_word_embeddings=tied)
    calib = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    options = dict(scheme="uint4_wo_16", n_samples=2, seqlen=32, quantize_lm_head=True, accuracy_level=0)
    four = awq_graph.compile(model, calib, tmp_path / "four", table_bits=4, **options)
    eight = awq_graph.compile(model, calib, tmp_path / "eight", table_bits=8, **options)
    assert eight.report["graph"]["kind"] == "kv-decoder" and eight.report["graph"]["check_deviation"] < 1e-5
    graph = onnx.load(tmp_path / "eight" / "model.onnx", load_external_data=False).graph
    (gather,) = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert next(a.i for a in gather.attribute if a.name == "bits") == 8
    reshaped = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Reshape"}
    data = reshaped.get(gather.input[0], gather.input[0])  # a tied table: the head's blocks, reshaped to rows
    assert data == ("lm_head.qweight" if tied else "model.embed_tokens.qweight"), data
    # a tied table is the head's 8-bit integers: a quarter of a float32 table less than an int4 copy
    # beside the head (1/4 + 1/8); untied, the table's own 8 bits cost an eighth more than its 4
    table = 320 * 64 * 4
    grown = eight.report["onnx_bytes"] - four.report["onnx_bytes"]
    assert (grown < -0.1 * table) if tied else (0.1 * table < grown < 0.2 * table), grown


@torch.library.custom_op("awq_graph_test::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_double.register_fake
def _(x):
    return torch.empty_like(x)


class _Doubled(torch.nn.Module):
    """A module whose output goes through a custom op torch.onnx cannot translate."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.ops.awq_graph_test.double(self.inner(x))


def test_a_graph_no_emitter_can_write_fails_before_calibration(tmp_path):
    model = tiny_model()
    model.model.norm = _Doubled(model.model.norm)
    with pytest.raises(awq_graph.ExportError, match=r"no ONNX translation for the op awq_graph_test\.double "
                                                     r"\(used in 'model\.norm'\), and no KV-cache decoder: "
                                                     r"`kv_cache=False`; nothing was quantized"):
        awq_graph.compile(model, "self", tmp_path / "out", kv_cache=False)  # no tokenizer: calibration would fail
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("llama", True), ("gemma", True)])
def test_a_4bit_head_is_searched_on_the_final_hidden_states_and_scaled_through_the_final_norm(tmp_path, model_type,
                                                                                              tied):
    """gemma: its final norm is x * (1 + w), the fold's offset case; tied: the head's matrix is the
    token table, which must keep its own (unscaled) values."""
    model = tiny_model(model_type, tie_word_embeddings=tied)
    calib = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    result = awq_graph.compile(model, calib, tmp_path / "out", scheme="uint4_wo_16", n_samples=8, seqlen=32,
                               quantize_lm_head=True, lm_head_bits=4, lm_head_group_size=16, accuracy_level=0)
    (head,) = [g for g in result.report["groups"] if g["layers"] == ["lm_head"]]
    assert head["prev_op"] == "model.norm" and head["ratio"] is not None  # a scale was chosen and folded
    assert any(c["linear"] == "lm_head" and c["clipped"] for c in result.report["clipping"])
    graph = result.report["graph"]
    assert graph["lm_head_bits"] == 4
    # the graph computes what torch computes with the folded norm and the head's integers (float activations)
    assert graph["kind"] == "kv-decoder" and graph["check_deviation"] < 1e-5
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(1))
    got = runtime.CompiledModel(tmp_path / "out").logits(ids)
    with torch.no_grad():
        ref = model(ids).logits
    # against the float model: a scaled table (the tied case done wrong) would be off by O(1)
    assert float((got - ref).norm() / ref.norm()) < 0.2  # measured ~0.1
    import onnx

    graph_proto = onnx.load(tmp_path / "out" / "model.onnx", load_external_data=False).graph
    initializers = {t.name for t in graph_proto.initializer}
    # tied: one copy of the integers, the lookup reads the head's (reshaped) and undoes its scale
    assert ("model.embed_tokens.qweight" not in initializers) == tied and "lm_head.qweight" in initializers
    lookup = next(n for n in graph_proto.node if n.op_type == "GatherBlockQuantized")
    assert lookup.input[0].startswith("model.embed_tokens/Reshape") == tied


def test_the_head_searched_a_block_of_rows_at_a_time_gives_the_same_integers(tmp_path, monkeypatch):
    """The head search works on HEAD_ROWS rows at a time (an 8B model's head is 128256 rows): the
    blocks' losses and clipping add up to the whole head's, so the integers do not depend on it."""
    from awq_graph.search import head as search

    model = tiny_model(tie_word_embeddings=True)
    calib = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    options = dict(scheme="uint4_wo_16", n_samples=8, seqlen=32, quantize_lm_head=True, lm_head_bits=4,
                   lm_head_group_size=16)
    awq_graph.compile(model, calib, tmp_path / "whole", **options)
    monkeypatch.setattr(search, "HEAD_ROWS", 96)  # 320 rows: blocks of 96, 96, 96 and 32
    awq_graph.compile(model, calib, tmp_path / "blocks", **options)
    import numpy as np
    import onnx
    from onnx import numpy_helper

    whole, blocks = ({t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / d / "model.onnx").graph.initializer}
                     for d in ("whole", "blocks"))
    assert set(whole) == set(blocks)
    for name in ("lm_head.qweight", "lm_head.qzeros"):
        assert np.array_equal(whole[name], blocks[name]), name
    # the float sums of the blocks round differently: the scale the grid picks moves by an ulp
    for name in whole:
        assert np.allclose(whole[name], blocks[name], rtol=1e-5, atol=0), name  # measured: 1.4e-9 on 1e-2 scales
