"""The KV-cache decoder: one ONNX file for prefill and decode that computes what torch computes,
greedy generation equal to the fake-quant torch model, and the `generate` command."""
import json

import numpy as np
import onnx
import pytest
import torch

import awq_graph
from awq_graph.cli import main
from awq_graph.emit import fake_quant_overrides, write_onnx
from awq_graph.export import export_model
from awq_graph.load import tiny_random_model
from awq_graph.core.numerics import QuantScheme
from awq_graph.runtime import CompiledModel
from awq_graph.search import SearchOptions, awq_search
from awq_graph.passes.check_config import derive_groups

from conftest import greedy_continuation, tiny_model

FAMILY = {
    "llama": {},  # grouped-query attention: 4 heads over 2 kv heads
    "qwen2": {},  # biases on q, k, v
    "qwen3": {},  # RMSNorm over each head of q and k
    "gemma": {},  # scaled embedding, x * (1 + w) norms, GELU (tanh) gate
    "phi3": {"pad_token_id": 0, "sliding_window": 6},  # fused qkv_proj and gate_up_proj, local window
    "mistral": {"sliding_window": 5},  # local attention window shorter than the test sequence
    # sandwich norms, local (window 5) then global layers, scores and logits capped by c * tanh(x / c)
    "gemma2": {"sliding_window": 5},
    # and per-head q/k norms, local layers with their own rotary base
    "gemma3_text": {"sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"]},
    # multipliers on the embedding, on each layer's outputs, as the attention scale; logits divided
    "granite": {"embedding_multiplier": 3.0, "residual_multiplier": 0.3, "attention_multiplier": 0.05,
                "logits_scaling": 4.0},
    "gpt2": {},  # LayerNorm with bias, learned positions, Conv1D weights, no rotary (its own block)
}


def _float_decoder(model, path):
    emitted = write_onnx(export_model(model), {}, path, model=model)
    assert emitted.kind == "kv-decoder" and emitted.warnings == []
    return CompiledModel(path)


@pytest.mark.parametrize("model_type", list(FAMILY))
def test_decoder_equals_torch_in_one_call_and_token_by_token(model_type, tmp_path):
    model = tiny_random_model("gpt2") if model_type == "gpt2" else tiny_model(model_type, **FAMILY[model_type])
    onnx_model = _float_decoder(model, tmp_path / "model.onnx")
    assert onnx_model.has_kv_cache
    ids = torch.randint(0, 320, (1, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    whole = onnx_model.logits(ids.numpy()).numpy()
    cached = onnx_model.logits_with_cache(ids.numpy(), prefill=6)  # 6 tokens, then 8 single steps
    for got in (whole, cached):
        assert np.abs(got - ref).max() < 1e-5 * np.abs(ref).max()  # measured ~3e-7


def test_position_ids_reach_the_rotary_embedding(tmp_path):
    model = tiny_model()
    onnx_model = _float_decoder(model, tmp_path / "model.onnx")
    ids = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(5), torch.arange(40, 45)]).unsqueeze(0)  # a gap: not a shift
    with torch.no_grad():
        ref = model(ids, position_ids=positions).logits.numpy()
        plain = model(ids).logits.numpy()
    assert np.abs(ref - plain).max() > 1e-3  # the gap changes the output
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 10), np.int64), "position_ids": positions.numpy(),
            "logits_to_keep": np.array(0, np.int64)}
    feed |= {n: np.zeros((1, 2, 0, 16), np.float32) for n in onnx_model.past_names}
    got = onnx_model.session.run(["logits"], feed)[0]
    assert np.abs(got - ref).max() < 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])  # mixtral: experts in QMoE, routing included
def test_int4_greedy_tokens_equal_the_fake_quant_torch_greedy_tokens(model_type, tmp_path):
    model = tiny_model() if model_type == "llama" else tiny_random_model(model_type)
    gm = export_model(model)
    _, per_layer, _ = derive_groups(gm)
    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    result = awq_search(gm, per_layer, calib, SearchOptions(scheme=QuantScheme(4, 16), loss_tokens=64))
    emitted = write_onnx(gm, result.quantized, tmp_path / "model.onnx", model=model)
    assert emitted.kind == "kv-decoder" and emitted.check_deviation < 1e-5
    onnx_model = CompiledModel(tmp_path / "model.onnx")
    fake = fake_quant_overrides(gm, result.quantized)
    gen = torch.Generator().manual_seed(2)
    for length in (1, 4, 9):
        prompt = torch.randint(0, 320, (length,), generator=gen).tolist()
        ids = torch.tensor([prompt])
        with torch.no_grad():  # the torch reference re-runs the whole prefix per token
            for _ in range(16):
                ids = torch.cat([ids, gm.run(ids, overrides=fake)[:, -1:].argmax(-1)], dim=1)
        assert onnx_model.greedy_ids(prompt, 16) == ids[0, length:].tolist()


def test_float16_activations_run_on_cpu_close_to_float32(tmp_path):
    model = tiny_model()
    calib = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    result = awq_graph.compile(model, calib, tmp_path / "fp16", scheme="uint4_wo_16", n_samples=2, seqlen=32,
                               act_dtype="float16")
    assert result.report["graph"]["kind"] == "kv-decoder" and result.report["graph"]["check_deviation"] < 1e-2
    inputs = {i.name: i.type for i in onnx.load(tmp_path / "fp16" / "model.onnx", load_external_data=False).graph.input}
    assert inputs["past_key_values.0.key"].tensor_type.elem_type == onnx.TensorProto.FLOAT16
    onnx_model = CompiledModel(tmp_path / "fp16")
    ids = np.random.default_rng(0).integers(0, 320, (1, 11))
    whole = onnx_model.logits(ids).numpy()
    cached = onnx_model.logits_with_cache(ids, prefill=3)
    assert np.abs(whole - cached).max() < 2e-2 * np.abs(whole).max()


def test_a_model_outside_the_fused_family_gets_the_logits_only_graph_and_still_generates(tmp_path):
    model = tiny_random_model("openai-gpt")  # GPT-1: transformers gives it no cache at all
    calib = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    result = awq_graph.compile(model, calib, tmp_path / "gpt1", scheme="uint4_wo_16", n_samples=2, seqlen=32)
    assert result.report["graph"]["kind"] == "logits-only"
    assert any("no KV-cache decoder for this model (model type 'openai-gpt'" in w and "its forward returns no cache" in w
               for w in result.report["warnings"])
    onnx_model = CompiledModel(tmp_path / "gpt1")
    assert not onnx_model.has_kv_cache
    prompt = [5, 17, 3]
    tokens = onnx_model.greedy_ids(prompt, 5)
    ids = torch.tensor([prompt + tokens])
    again = onnx_model.logits(ids.numpy())[0, len(prompt) - 1:-1].argmax(-1).tolist()
    assert again == tokens  # each token was the argmax after the prefix before it


def test_a_decoder_that_differs_from_torch_is_replaced_by_the_logits_only_graph(tmp_path, monkeypatch):
    import awq_graph.emit.decoder as emit_decoder

    real = emit_decoder.decoder_shape
    monkeypatch.setattr(emit_decoder, "decoder_shape",
                        lambda *args: real(*args).__class__(**{**real(*args).__dict__, "eps": 0.5}))
    model = tiny_model()
    emitted = write_onnx(export_model(model), {}, tmp_path / "model.onnx", model=model)
    assert emitted.kind == "logits-only"
    assert "differs from the torch program" in emitted.warnings[0]
    assert not CompiledModel(tmp_path / "model.onnx").has_kv_cache


def test_a_decoder_onnxruntime_refuses_is_replaced_by_the_logits_only_graph(tmp_path, monkeypatch):
    import awq_graph.emit.decoder as emit_decoder

    monkeypatch.setattr(emit_decoder, "_activate", lambda g, x, activation, name: g.op("NoSuchOp", [x], name))
    model = tiny_model()
    emitted = write_onnx(export_model(model), {}, tmp_path / "model.onnx", model=model)
    assert emitted.kind == "logits-only"
    assert "the fused KV-cache decoder failed in onnxruntime (" in emitted.warnings[0]


@pytest.fixture(scope="module")
def compiled_tiny(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "out"
    assert main(["compile", str(tiny_checkpoint), "-o", str(out), "--rtn", "--group-size", "16",
                 "--quantize-lm-head"]) == 0
    return out


def test_generate_streams_the_continuation_and_reports_tokens_per_second(compiled_tiny, capsys):
    report = json.loads((compiled_tiny / "report.json").read_text())
    assert report["graph"]["kind"] == "kv-decoder" and report["graph"]["lm_head_bits"] == 8
    assert report["graph"]["accuracy_level"] == 4  # the default: int8 activations in MatMulNBits
    assert 1e-4 < report["graph"]["check_deviation"] < 5e-2  # int8 rounding shows; a wrong graph is O(1)
    levels = {a.i for n in onnx.load(compiled_tiny / "model.onnx", load_external_data=False).graph.node
              if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    capsys.readouterr()
    assert main(["generate", str(compiled_tiny), "the king of", "--max-new-tokens", "12", "--greedy"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("the king of") and len(out.strip()) > len("the king of")
    assert "prefill" in err and "tok/s" in err and "(KV cache)" in err
    assert out.rstrip("\n") == greedy_continuation(compiled_tiny, "the king of", 12)


def test_sampling_is_reproducible_with_a_seed(compiled_tiny, capsys):
    runs = []
    for seed in (3, 3, 4):
        capsys.readouterr()
        assert main(["generate", str(compiled_tiny), "the river", "--max-new-tokens", "16", "--temperature", "1.5",
                     "--seed", str(seed)]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] != runs[2]


def test_generate_on_a_folder_that_is_not_compiled_is_a_one_line_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "hello"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"awq-graph: error: {tmp_path} is not a compiled awq-graph folder (no model.onnx)"


def test_logits_to_keep_returns_the_last_positions_only(tmp_path):
    model = tiny_model()
    onnx_model = _float_decoder(model, tmp_path / "model.onnx")
    ids = np.random.default_rng(3).integers(0, 320, (1, 9))
    feed = {"input_ids": ids, "attention_mask": np.ones((1, 9), np.int64), "position_ids": np.arange(9)[None],
            "logits_to_keep": np.array(0, np.int64)}
    feed |= {n: np.zeros((1, 2, 0, 16), np.float32) for n in onnx_model.past_names}
    full = onnx_model.session.run(["logits"], feed)[0]
    assert full.shape == (1, 9, 320)  # 0 keeps every position
    for k in (1, 4):
        last = onnx_model.session.run(["logits"], feed | {"logits_to_keep": np.array(k, np.int64)})[0]
        np.testing.assert_allclose(last, full[:, -k:], rtol=1e-5, atol=1e-6)


def test_cuda_provider_without_onnxruntime_gpu_is_a_clear_error(compiled_tiny, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    assert main(["generate", str(compiled_tiny), "the king", "--provider", "cuda"]) == 1
    assert capsys.readouterr().err.strip() == ("awq-graph: error: --provider cuda: this onnxruntime has no CUDA "
                                               "provider (pip install onnxruntime-gpu)")


def test_score_is_the_perplexity_of_the_text_under_the_onnx_model(compiled_tiny):
    model = CompiledModel(compiled_tiny)
    text = " ".join(f"the king of the city is {i}" for i in range(60))
    ppl, tokens = model.score(text, seqlen=64, max_windows=2)
    ids = torch.tensor(model.tokenizer(text, add_special_tokens=False).input_ids[:128]).view(2, 64)
    logits = model.logits(ids.numpy())[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert tokens == 2 * 63 and abs(ppl - float(torch.exp(nll))) < 1e-3 * ppl


@pytest.mark.parametrize("model_type", ["qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2"])
def test_awq_compiles_of_the_other_family_members_pass_the_decoder_check(model_type, tmp_path):
    """Folded scales included: gemma's (1 + w) norms carry 1/s in w, the decoder adds the 1."""
    model = tiny_random_model("gpt2") if model_type == "gpt2" else tiny_model(model_type, **FAMILY[model_type])
    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    result = awq_graph.compile(model, calib, tmp_path / "out", scheme="uint4_wo_16", n_samples=4, seqlen=32,
                               accuracy_level=0)
    assert any(g["ratio"] is not None for g in result.report["groups"])  # scales were folded
    graph = result.report["graph"]
    assert graph["kind"] == "kv-decoder" and graph["check_deviation"] < 1e-5, graph


def test_cuda_provider_generates_what_the_cpu_provider_generates(tmp_path):
    """float16 activations on onnxruntime-gpu's CUDA provider; skipped where it is absent."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA provider in this onnxruntime (pip install onnxruntime-gpu on a GPU machine)")
    model = tiny_model()
    calib = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    awq_graph.compile(model, calib, tmp_path / "fp16", scheme="uint4_wo_16", n_samples=2, seqlen=32,
                      act_dtype="float16", quantize_lm_head=True)
    cpu = CompiledModel(tmp_path / "fp16")
    cuda = CompiledModel(tmp_path / "fp16", provider="cuda")
    assert "CUDAExecutionProvider" in cuda.session.get_providers()
    ids = np.random.default_rng(0).integers(0, 320, (1, 16))
    ref, got = cpu.logits(ids).numpy(), cuda.logits(ids).numpy()
    assert np.abs(got - ref).max() < 3e-2 * np.abs(ref).max()
    assert cuda.greedy_ids([5, 6, 7], 8)[:4] == cpu.greedy_ids([5, 6, 7], 8)[:4]


def test_the_lm_head_is_found_behind_gemma2s_logit_softcap():
    from awq_graph.core.analysis import output_head

    model = tiny_model("gemma2")  # logits = 30 * tanh(lm_head(h) / 30)
    assert model.config.final_logit_softcapping and output_head(export_model(model)) == "lm_head"
