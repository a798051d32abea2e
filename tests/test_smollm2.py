"""SmolLM2-135M end to end through the CLI: AWQ beats round-to-nearest on held-out text.

Fixed slice: calibration = the first 8 x 512 tokens of WikiText-2 validation (tokenized
release); evaluation = the first 8 windows of 512 tokens of WikiText-2 test.
"""
import json

import pytest

from awq_graph.cli import main

pytestmark = pytest.mark.slow


def _ppl(out, data_dir, capsys):
    capsys.readouterr()
    assert main(["eval", str(out), "--text", str(data_dir / "wikitext2-test.txt"), "--seqlen", "512",
                 "--max-windows", "8", "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"]


def test_awq_perplexity_is_below_rtn_on_smollm2(smollm2_gguf, data_dir, tmp_path, capsys):
    awq, rtn = tmp_path / "awq", tmp_path / "rtn"
    assert main(["compile", str(smollm2_gguf), "-o", str(awq), "--calib", str(data_dir / "wikitext2-valid-tokenized.txt"),
                 "--n-samples", "8", "--seqlen", "512"]) == 0
    assert main(["compile", str(smollm2_gguf), "-o", str(rtn), "--rtn"]) == 0
    report = json.loads((awq / "report.json").read_text())
    assert report["quantized_linears"] == 30 * 7
    vo = [g for g in report["groups"] if g["prev_op"].endswith("v_proj")]
    assert len(vo) == 30  # the grouped-query v -> o pair is searched in every layer
    ppl_awq, ppl_rtn = _ppl(awq, data_dir, capsys), _ppl(rtn, data_dir, capsys)
    print(f"SmolLM2 uint4 g128, 8 x 512 eval tokens: AWQ {ppl_awq:.3f} RTN {ppl_rtn:.3f}")
    assert ppl_awq < ppl_rtn
