"""Scaling groups across the causal-LM architectures transformers ships, from tiny random
models built offline: every derived group must be exact (folding random scales leaves the
logits unchanged), the usual pairs must be found without any per-architecture table, and the
derived groups must equal the reviewed goldens (tests/golden/groups, made by tools/golden_groups.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import awq_graph
from awq_graph import runtime
from awq_graph.export import export_model
from awq_graph.load import tiny_random_model
from awq_graph.core.numerics import QuantScheme
from awq_graph.emit import write_onnx
from awq_graph.search import SearchOptions, awq_search
from awq_graph.match import match
from awq_graph.passes.check_config import derive_groups

GOLDEN = Path(__file__).resolve().parent / "golden" / "groups"  # written by tools/golden_groups.py

# architecture -> pairs (prev_op, layers) that must be among the groups of decoder layer 0
EXPECTED = {
    "llama": [("input_layernorm", "self_attn.q_proj,self_attn.k_proj,self_attn.v_proj"),
              ("self_attn.v_proj", "self_attn.o_proj"),
              ("post_attention_layernorm", "mlp.gate_proj,mlp.up_proj"), ("mlp.up_proj", "mlp.down_proj")],
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "llama",  # norms written x * (1 + w)
    "gemma2": [("input_layernorm", "self_attn.q_proj,self_attn.k_proj,self_attn.v_proj"),
               ("self_attn.v_proj", "self_attn.o_proj"),  # the MLP is fed by its own pre-norm
               ("pre_feedforward_layernorm", "mlp.gate_proj,mlp.up_proj"), ("mlp.up_proj", "mlp.down_proj")],
    "gemma3_text": "gemma2",
    "phi3": [("input_layernorm", "self_attn.qkv_proj"), ("self_attn.qkv_proj", "self_attn.o_proj"),
             ("post_attention_layernorm", "mlp.gate_up_proj"), ("mlp.gate_up_proj", "mlp.down_proj")],
    "gpt2": [("ln_1", "attn.c_attn"), ("attn.c_attn", "attn.c_proj"), ("ln_2", "mlp.c_fc")],
    "mixtral": [("input_layernorm", "self_attn.q_proj,self_attn.k_proj,self_attn.v_proj"),
                ("self_attn.v_proj", "self_attn.o_proj"),
                # the router reads the scaled tensor, so it is compensated too; the experts are
                # weight banks (E, out, in) behind a token gather and grouped_mm
                ("post_attention_layernorm", "mlp.gate,mlp.experts.gate_up_proj"),
                ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")],
    "qwen3_moe": "mixtral",
    "olmoe": "mixtral",  # q and k normed over the whole projection
    "qwen2_moe": [("input_layernorm", "self_attn.q_proj,self_attn.k_proj,self_attn.v_proj"),
                  ("self_attn.v_proj", "self_attn.o_proj"),
                  # a shared expert and its sigmoid gate read the normed tensor beside the router
                  ("post_attention_layernorm", "mlp.shared_expert.gate_proj,mlp.shared_expert.up_proj,mlp.gate,"
                                               "mlp.experts.gate_up_proj,mlp.shared_expert_gate"),
                  ("mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"),
                  ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")],
}


def _pairs(prefix, groups):
    base = f"{prefix}.0."
    return {(g.prev_op.removeprefix(base), ",".join(x.removeprefix(base) for x in g.layers)) for g in groups}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def arch(request):
    model_type = request.param
    gm = export_model(tiny_random_model(model_type))
    return model_type, gm


def test_derived_groups_contain_the_known_pairs_and_are_exact(arch):
    model_type, gm = arch
    found = match(gm, verify=True)
    expected = EXPECTED[model_type]
    expected = EXPECTED[expected] if isinstance(expected, str) else expected
    assert set(expected) <= _pairs(found.prefix, found.per_layer[0])
    check = found.verification
    assert check.deviation < 1e-4, check  # measured 2e-7 .. 8e-7
    # every group's fold edits its source and its layers: more parameters changed than groups
    assert check.changed_params > found.n_groups, check


# in CI: the fused families, and types that show the other paths (the generic decoder: cohere,
# olmo2, stablelm; a layer_norm(1 + w) fold point: nemotron; the export retried: aria_text);
# tools/arch_table.py --all compares every golden
GOLDEN_SAMPLE = sorted(EXPECTED) + ["granite", "starcoder2", "cohere", "olmo2", "stablelm", "nemotron", "aria_text"]


def test_every_architecture_the_survey_found_groups_for_has_a_reviewed_golden():
    survey = json.loads((Path(__file__).resolve().parents[1] / "tools" / "results" / "arch_survey.json").read_text())
    with_groups = [r["type"] for r in survey["rows"] if r["status"] == "groups"]
    assert len(with_groups) >= 80  # the target: groups derived and verified for at least 80 types
    missing = [t for t in with_groups if not (GOLDEN / f"{t}.json").exists()]
    assert not missing, f"no golden for {missing[:5]}: run python tools/golden_groups.py --survey"


@pytest.mark.parametrize("model_type", GOLDEN_SAMPLE)
def test_derived_groups_equal_the_reviewed_golden_groups(model_type):
    """Exactly the golden groups: an extra (wrong) group, a lost one or a changed channel map fails."""
    path = GOLDEN / f"{model_type}.json"
    assert path.exists(), f"no golden for {model_type}: run python tools/golden_groups.py {model_type}"
    found = match(export_model(tiny_random_model(model_type)))
    assert {"model_type": model_type, **found.to_json()} == json.loads(path.read_text()), \
        f"groups differ from {path.name}: regenerate with tools/golden_groups.py and review the diff"


@pytest.mark.parametrize("model_type", ["gpt2", "phi3", "gemma2", "olmoe"])
def test_compiled_int4_model_matches_fake_quant_torch(model_type, tmp_path):
    """Conv1D (addmm), fused projections, (1 + w) norms and banks of MoE experts (our translation
    of grouped_mm_fallback, one MatMulNBits per expert) all reach a correct logits-only
    MatMulNBits model."""
    gm = export_model(tiny_random_model(model_type))
    _, per_layer, _ = derive_groups(gm)
    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    result = awq_search(gm, per_layer, calib, SearchOptions(scheme=QuantScheme(4, 16), loss_tokens=64))
    write_onnx(gm, result.quantized, tmp_path / "model.onnx", kv_cache=False)
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(1))
    fake = {gm.linears[n].weight: gm.linears[n].stored(q.dequantize()) for n, q in result.quantized.items()}
    with torch.no_grad():
        ref = gm.run(ids, overrides=fake)
    got = runtime.CompiledModel(tmp_path / "model.onnx").logits(ids)
    assert float((got - ref).norm() / ref.norm()) < 1e-4


def test_the_survey_gives_every_architecture_a_row_even_one_that_stops(tmp_path):
    """tools/arch_table.py --all over three model types, each in a process of its own: llama's groups
    derived and exact; aria_text's dynamic export fails on a length constraint and its retry
    (``Dim.AUTO``) keeps the length dynamic; xmod's export stops (its modeling code needs a
    language set), and is a row that says where and why, not the end of the survey."""
    repo = Path(__file__).resolve().parents[1]
    results, doc = tmp_path / "survey.json", tmp_path / "architectures.md"
    run = subprocess.run([sys.executable, str(repo / "tools" / "arch_table.py"), "--all", "llama", "aria_text", "xmod",
                          "--results", str(results), "--doc", str(doc)], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(repo)})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["type"]: r for r in json.loads(results.read_text())["rows"]}
    assert rows["llama"]["status"] == "groups" and rows["llama"]["groups_per_layer"] == 4
    assert rows["llama"]["deviation"] < 1e-4 and rows["llama"]["graph"] == "KV-cache decoder"
    assert rows["aria_text"]["status"] == "groups" and rows["aria_text"]["fixed_seq"] is None, rows["aria_text"]
    assert rows["aria_text"]["deviation"] < 1e-4
    assert rows["xmod"]["status"] == "export failed", rows["xmod"]
    assert "Input language unknown" in rows["xmod"]["reason"]
    table = doc.read_text()
    assert "3 model types: groups derived and exact under --verify for **2**" in table
    assert "| xmod | - | - | - | - | - | export failed: torch.export could not capture" in table


def test_an_architecture_whose_export_fixes_the_length_compiles_at_that_length(tmp_path):
    """Mamba's reference scan is a Python loop over positions: torch.export cannot keep the length
    dynamic, so the export is retried with ``Dim.AUTO`` and fixes it at the calibration length.
    The analysis, the verification and the search run at that length; the logits-only graph (asked
    for: by default Mamba gets the generic decoder, one token per step, tests/test_generic_decoder.py)
    takes up to that many tokens, a shorter sequence padded on the right (exact for a causal LM)."""
    model = tiny_random_model("mamba")
    ids = torch.randint(3, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    result = awq_graph.compile(model, ids, tmp_path / "out", n_samples=4, seqlen=16, scheme="uint4_wo_16",
                               kv_cache=False, warn=lambda message: None)
    report = result.report
    assert report["export"] == {"fixed_seq": 16} and report["graph"]["kind"] == "logits-only"
    assert any("fixed this architecture's sequence length to 16" in w for w in report["warnings"])
    assert report["groups"], "the groups were derived and searched at the fixed length"
    compiled = runtime.CompiledModel(tmp_path / "out")
    assert compiled.fixed_len == 16 and compiled.max_positions == 16
    prompt = ids[:1, :10]
    padded = compiled.logits(prompt)
    followed = compiled.logits(ids[:1])[:, :10]  # the same ten tokens, then six others
    assert float((padded - followed).abs().max()) < 1e-4  # measured 0: padding is exact
    with torch.no_grad():
        ref = model(prompt).logits
    assert float((padded - ref).norm() / ref.norm()) < 0.2  # int4 g16 on random weights: measured 0.083
    with pytest.raises(awq_graph.InputError, match="takes at most 16 tokens"):
        compiled.logits(torch.zeros(1, 17, dtype=torch.long))


def test_a_composite_model_is_shrunk_in_its_text_and_vision_configs():
    """gemma3 (a text and a vision config): the tiny shape reaches the sub-configs (at their default
    sizes the build was killed, out of memory, in the survey), and the language model's groups are
    found and exact."""
    model = tiny_random_model("gemma3")
    params = sum(p.numel() for p in model.parameters())
    assert params < 2_000_000, params
    found = match(export_model(model), verify=True)
    assert found.prefix == "model.language_model.layers" and found.n_groups == 2 * 4
    assert found.verification.deviation < 1e-4, found.verification  # measured 6.2e-7
