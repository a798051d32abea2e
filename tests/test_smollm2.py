"""SmolLM2-135M end to end through the CLI: AWQ beats round-to-nearest on held-out text.

Fixed slice: calibration = the first 8 x 512 tokens of WikiText-2 validation (tokenized
release); evaluation = the first 8 windows of 512 tokens of WikiText-2 test.
"""
import json

import pytest

from awq_graph.cli import main

from conftest import genai_greedy

pytestmark = pytest.mark.slow


def _ppl(out, data_dir, capsys):
    capsys.readouterr()
    assert main(["eval", str(out), "--text", str(data_dir / "wikitext2-test.txt"), "--seqlen", "512",
                 "--max-windows", "8", "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"]


def test_awq_perplexity_is_below_rtn_on_smollm2(smollm2_gguf, data_dir, tmp_path, capsys):
    awq, rtn = tmp_path / "awq", tmp_path / "rtn"
    assert main(["compile", str(smollm2_gguf), "-o", str(awq), "--calib", str(data_dir / "wikitext2-valid-tokenized.txt"),
                 "--n-samples", "4", "--seqlen", "512", "--loss-tokens", "512", "--grid", "10"]) == 0  # a short search: CI's time
    assert main(["compile", str(smollm2_gguf), "-o", str(rtn), "--rtn"]) == 0
    report = json.loads((awq / "report.json").read_text())
    assert report["quantized_linears"] == 30 * 7 + 1  # and the head (8-bit, its table tied to it)
    vo = [g for g in report["groups"] if g["prev_op"].endswith("v_proj")]
    assert len(vo) == 30  # the grouped-query v -> o pair is searched in every layer
    ppl_awq, ppl_rtn = _ppl(awq, data_dir, capsys), _ppl(rtn, data_dir, capsys)
    print(f"SmolLM2 uint4 g128, 8 x 512 eval tokens: AWQ {ppl_awq:.3f} RTN {ppl_rtn:.3f}")
    assert ppl_awq < ppl_rtn
    # onnxruntime-genai runs the folder as written and prints what `awq-graph generate --greedy` prints
    for prompt in ("The capital of France is", "def fibonacci(n):"):
        capsys.readouterr()
        assert main(["generate", str(awq), prompt, "--greedy", "--max-new-tokens", "24"]) == 0
        # print() adds a newline to the text, which may end with newline tokens of its own
        assert capsys.readouterr().out.rstrip("\n") == _genai_greedy_text(awq, prompt, 24).rstrip("\n")


def _genai_greedy_text(folder, prompt: str, new: int) -> str:
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(og.Model(str(folder)))
    out = genai_greedy(folder, list(tokenizer.encode(prompt)), new)
    eos = set(json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"])
    return prompt + tokenizer.decode([t for t in out if t not in eos])


def test_int4_smollm2_greedy_starts_like_the_fake_quant_torch_model(smollm2_loaded, tmp_path):
    """KV-cache decoding in onnxruntime vs the torch program with the same int4 weights."""
    import torch

    from awq_graph.emit import fake_quant_overrides, write_onnx
    from awq_graph.export import export_model
    from awq_graph.core.numerics import QuantScheme
    from awq_graph.runtime import CompiledModel
    from awq_graph.search import rtn

    model, tokenizer = smollm2_loaded
    gm = export_model(model)
    result = rtn(gm, QuantScheme(4, 128))  # the program has its own copies: the shared model stays as loaded
    emitted = write_onnx(gm, result.quantized, tmp_path / "model.onnx", model=model)
    assert emitted.kind == "kv-decoder" and emitted.check_deviation < 1e-4
    onnx_model = CompiledModel(tmp_path / "model.onnx", tokenizer=tokenizer)
    fake = fake_quant_overrides(gm, result.quantized)
    for prompt in ("The capital of France is", "def fibonacci(n):", "Water boils at"):
        ids = torch.tensor([tokenizer(prompt).input_ids])
        n = ids.shape[1]
        with torch.no_grad():
            for _ in range(8):
                ids = torch.cat([ids, gm.run(ids, overrides=fake)[:, -1:].argmax(-1)], dim=1)
        assert onnx_model.greedy_ids(ids[0, :n].tolist(), 8)[:6] == ids[0, n:n + 6].tolist(), prompt


def test_the_gguf_read_tensor_by_tensor_equals_transformers_whole_file_dequantization(smollm2_gguf, smollm2_loaded):
    """The per-tensor reader (memory-mapped, one tensor dequantized at a time) gives every
    parameter exactly as transformers' loading of the whole file does, q/k row order included."""
    import torch

    from awq_graph.gguf_weights import GGUFWeights

    weights = GGUFWeights(smollm2_gguf)
    model, _ = smollm2_loaded
    params = dict(model.named_parameters())
    assert set(weights.names()) == set(params)  # the tied head is the table: one tensor in the file
    for name in weights.names():
        assert torch.equal(weights.get(name), params[name].detach()), name
