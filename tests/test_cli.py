"""The command line end to end on a tiny checkpoint, and one-line errors on bad input."""
import json
import os
import re
from pathlib import Path

import pytest

from awq_graph.cli import OPTION_NAMED, main, respell

REPO = Path(__file__).resolve().parents[1]


def _text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"the king of the city is {i} and the river of the world is {i * 7}" for i in range(400)))
    return path


def test_compile_then_eval_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    calib = _text_file(tmp_path)
    assert main(["compile", str(tiny_checkpoint), "-o", str(out), "--calib", str(calib), "--n-samples", "8",
                 "--seqlen", "64", "--group-size", "32"]) == 0
    names = {p.name for p in out.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}  # readable by others, as cp makes
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert names == {"model.onnx", "model.onnx.data", "awq_config.json", "report.json", "tokenizer.json",
                     "tokenizer_config.json", "genai_config.json", "config.json", "generation_config.json"}
    report = json.loads((out / "report.json").read_text())
    assert report["scheme"] == "uint4_wo_32" and report["quantized_linears"] == 14 + 1  # 2 layers of 7, the head
    assert report["graph"]["lm_head_bits"] == report["graph"]["table_bits"] == 8  # the default
    assert report["calibration"] == {"samples": 8, "seqlen": 64}
    assert any(g["ratio"] is not None and g["loss_awq"] < g["loss_rtn"] for g in report["groups"])  # a scale won
    assert list(report["timings_s"]) == ["load", "export", "calibration", "match", "search", "emit"]
    least = report["least_weight_bytes"]  # the free-space check's lower bound of model.onnx.data, and the data
    assert least["int4"] > 0 and 0 < least["int4"] + least["other"] <= report["onnx_bytes"], (least, report["onnx_bytes"])
    config = json.loads((out / "awq_config.json").read_text())
    assert len(config["scaling_layers"]) == 4
    # two samples past the eight held aside (a quarter of --n-samples), checked per layer and end to end, and said
    check = report["held_aside_check"]
    assert (check["held_samples"], check["held_tokens"], len(check["layers"])) == (2, 128, 2)
    assert check["written"] in check["nll"] and set(check["nll"]) >= {"float", "searched", "unclipped", "rtn"}
    assert "held-aside check (2 samples, 128 tokens" in capsys.readouterr().err
    assert main(["eval", str(out), "--text", str(calib), "--seqlen", "64", "--max-windows", "3", "--json"]) == 0
    int4 = json.loads(capsys.readouterr().out.strip())
    assert main(["eval", str(tiny_checkpoint), "--text", str(calib), "--seqlen", "64", "--max-windows", "3",
                 "--json"]) == 0  # the float checkpoint, in torch
    float_ = json.loads(capsys.readouterr().out.strip())
    assert int4["tokens"] == float_["tokens"] == 3 * 63
    # int4 (g32) of the random tiny model stays near its float perplexity: measured 332.9 vs 331.6 (+0.4%)
    assert abs(int4["ppl"] / float_["ppl"] - 1) < 0.03, (int4, float_)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_compile_with_self_calibration_and_a_user_config(tiny_checkpoint, tmp_path):
    out = tmp_path / "first"
    assert main(["compile", str(tiny_checkpoint), "-o", str(out), "--n-samples", "4", "--seqlen", "32",
                 "--group-size", "16", "--sym", "--no-clip"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["calibration_source"] == "self" and report["method"] == "awq" and report["scheme"] == "int4_wo_16"
    again = tmp_path / "second"
    assert main(["compile", str(tiny_checkpoint), "-o", str(again), "--n-samples", "4", "--seqlen", "32",
                 "--group-size", "16", "--config", str(out / "awq_config.json")]) == 0
    assert json.loads((again / "awq_config.json").read_text())["scaling_layers"] == \
        json.loads((out / "awq_config.json").read_text())["scaling_layers"]


def _bad_config(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model_decoder_layers": "model.layers", "scaling_layers": [
        {"prev_op": "input_layernorm", "layers": ["self_attn.q_proj", "self_attn.qkv_fused"], "inp": "self_attn.q_proj"}]}))
    return path


def _corrupt_gguf(tmp_path, magic):
    path = tmp_path / "broken.gguf"
    path.write_bytes((b"GGUF" if magic else b"NOPE") + b"\x03\x00\x00\x00" + b"\x00" * 40)
    return path


def _file(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _folder(path):
    path.mkdir()
    return path


def _weights_only(checkpoint, tmp_path, keep=("config.json", "model.safetensors")):
    """A copy of the checkpoint with only the files ``keep``."""
    import shutil

    folder = tmp_path / "partial"
    folder.mkdir()
    for name in keep:
        shutil.copy(checkpoint / name, folder / name)
    return folder


@pytest.mark.parametrize("case,args,culprit", [
    ("missing folder", lambda ck, tmp: ["/no/such/model"], "/no/such/model"),
    ("only a config", lambda ck, tmp: [str(_weights_only(ck, tmp, ["config.json"]))], "has no weights"),
    ("no tokenizer for self calibration", lambda ck, tmp: [str(_weights_only(ck, tmp))], "has no tokenizer"),
    ("random bytes", lambda ck, tmp: [str(ck), "--calib", str(_file(tmp, "noise.txt", bytes(range(256)) * 80))],
     "noise.txt is not UTF-8 text"),
    ("jsonl text not a string", lambda ck, tmp: [str(ck), "--calib", str(_file(tmp, "c.jsonl", b'{"text": 5}\n'))],
     "line 1: 'text' is a int, not a string"),
    ("calibration folder", lambda ck, tmp: [str(ck), "--calib", str(_folder(tmp / "texts"))], "is a folder, not a file"),
    ("group wider than every layer", lambda ck, tmp: [str(ck), "--group-size", "4096"],
     "wider than every quantized layer's input"),
    ("not gguf", lambda ck, tmp: [str(_corrupt_gguf(tmp, False))], "broken.gguf"),
    ("truncated gguf", lambda ck, tmp: [str(_corrupt_gguf(tmp, True))], "broken.gguf"),
    ("unknown module in config", lambda ck, tmp: [str(ck), "--config", str(_bad_config(tmp))], "self_attn.qkv_fused"),
    ("bits", lambda ck, tmp: [str(ck), "--bits", "3"], "bits=3"),
    ("group size", lambda ck, tmp: [str(ck), "--group-size", "48"], "group size 48"),
    ("missing calibration file", lambda ck, tmp: [str(ck), "--calib", str(tmp / "nope.txt")], "nope.txt"),
])
def test_bad_input_is_one_line_naming_the_culprit_and_leaves_no_output(tiny_checkpoint, tmp_path, capsys, case, args, culprit):
    out = tmp_path / "out"
    code = main(["compile", *args(tiny_checkpoint, tmp_path), "-o", str(out), "--n-samples", "2", "--seqlen", "16"])
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("awq-graph:")]
    assert code == 1
    assert len(ours) == 1 and ours[0].startswith("awq-graph: error:") and culprit in ours[0], err
    assert err.strip().endswith(ours[0]) and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_an_existing_output_folder_is_not_overwritten_unless_asked(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["compile", str(tiny_checkpoint), "-o", str(out), "--rtn", "--group-size", "16"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["compile", str(tiny_checkpoint), "-o", str(out), "--rtn", "--group-size", "16", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.onnx").exists()


def _tree(folder: Path) -> dict:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("where", ["the checkpoint", "inside the checkpoint", "above the checkpoint"])
def test_an_output_folder_that_is_holds_or_sits_in_the_input_is_refused_even_with_overwrite(
        tiny_checkpoint, tmp_path, capsys, where):
    import shutil

    model = tmp_path / "parent" / "model"
    shutil.copytree(tiny_checkpoint, model)
    before = _tree(tmp_path / "parent")
    out = {"the checkpoint": model, "inside the checkpoint": model / "out", "above the checkpoint": model.parent}[where]
    assert main(["compile", str(model), "-o", str(out), "--rtn", "--group-size", "16", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert err.count("awq-graph: error:") == 1 and f"the input {model}" in err and "Traceback" not in err, err
    assert _tree(tmp_path / "parent") == before  # the user's checkpoint, byte for byte


@pytest.mark.parametrize("case", ["a file", "under a file"])
def test_an_output_path_that_cannot_be_a_folder_fails_before_loading(tiny_checkpoint, tmp_path, capsys, case):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker if case == "a file" else blocker / "out"
    assert main(["compile", str(tiny_checkpoint), "-o", str(out), "--rtn", "--group-size", "16", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err and "load" not in err, err
    assert blocker.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]  # no .blocker.old-* or .tmp-* beside it


@pytest.mark.parametrize("tensor, value", [("model.layers.1.mlp.down_proj.weight", float("nan")),
                                           ("model.layers.0.input_layernorm.weight", float("inf"))])
def test_a_checkpoint_with_nan_or_inf_weights_is_refused_naming_the_tensor(tmp_path, capsys, tensor, value):
    import torch

    from conftest import tiny_model, tiny_tokenizer

    model = tiny_model()
    with torch.no_grad():
        param = model.get_parameter(tensor)
        if tensor.endswith("down_proj.weight"):
            param[3, 5] = value  # one entry
        else:
            param.fill_(value)  # a whole norm
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    assert main(["compile", str(tmp_path / "model"), "-o", str(out), "--rtn", "--group-size", "16"]) == 1
    err = capsys.readouterr().err
    assert err.count("awq-graph: error:") == 1 and f"weight '{tensor}' holds" in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("argv, flag", [
    (["compile", "M", "-o", "O", "--n-samples", "0"], "--n-samples"),
    (["compile", "M", "-o", "O", "--n-samples", "-3"], "--n-samples"),
    (["compile", "M", "-o", "O", "--seqlen", "0"], "--seqlen"),
    (["compile", "M", "-o", "O", "--seqlen", "1"], "--seqlen"),  # one token has nothing to predict
    (["compile", "M", "-o", "O", "--seqlen", "-5"], "--seqlen"),
    (["compile", "M", "-o", "O", "--loss-tokens", "0"], "--loss-tokens"),
    (["compile", "M", "-o", "O", "--grid", "0"], "--grid"),
    (["eval", "M", "--text", "T", "--seqlen", "1"], "--seqlen"),
    (["eval", "M", "--text", "T", "--seqlen", "0"], "--seqlen"),
    (["eval", "M", "--text", "T", "--seqlen", "-5"], "--seqlen"),
    (["eval", "M", "--text", "T", "--max-windows", "-1"], "--max-windows"),
    (["eval", "M", "--text", "T", "--threads", "0"], "--threads"),
    (["generate", "M", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "M", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "M", "hi", "--top-k", "-3"], "--top-k"),
    (["generate", "M", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "M", "hi", "--max-new-tokens", "ten"], "--max-new-tokens"),
])
def test_an_option_out_of_range_is_one_line_naming_the_flag_before_anything_is_read(argv, flag, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)  # M, O and T do not exist: the option is checked first
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"awq-graph: error: argument {flag}: must be") and "Traceback" not in err, err


@pytest.mark.parametrize("flag", ["--lm-head-bits", "--lm-head-group-size", "--table-bits"])
def test_an_option_that_applies_only_with_another_is_refused_without_it(flag, capsys):
    with pytest.raises(SystemExit) as stop:  # the head and the table stay float
        main(["compile", "M", "-o", "O", "--no-quantize-lm-head", flag, "32" if flag.endswith("size") else "8"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(f"awq-graph: error: argument {flag}: applies only without "
                                                   "--no-quantize-lm-head"), err


def test_a_head_group_size_matmulnbits_cannot_take_is_one_line_naming_the_flag(capsys):
    assert main(["compile", "M", "-o", "O", "--quantize-lm-head", "--lm-head-group-size", "48"]) == 1  # M is not read
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lm-head-group-size 48" in err and "power of two" in err, err


def test_the_cli_says_each_option_a_library_message_names_as_a_flag_it_has(capsys):
    """Library messages name an option as the Python API spells it (`seqlen=4096`); the CLI
    says it as the flag that sets it, and every option named anywhere in the library is one."""
    assert respell("`seqlen=4096` is longer") == "--seqlen 4096 is longer"
    assert respell("pass `overwrite=True` to replace it") == "pass --overwrite to replace it"
    assert respell("`kv_cache='generic'`, `stream=False`, `out_dir` x, `device=cuda:1`, `rtn_only=True`") == (
        "--generic-decoder, --no-stream, -o x, --device cuda:1, --rtn")
    flags = set()
    for command in ("compile", "eval", "generate", "infer-config", "check-config"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        flags |= set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", capsys.readouterr().out))
    named = set()
    for path in [*(REPO / "awq_graph").glob("**/*.py")]:
        if path.name != "cli.py":
            named |= {found.group(0) for found in OPTION_NAMED.finditer(path.read_text())}
    assert len(named) > 20, named
    unknown = sorted(f"{option} -> {respell(option)}" for option in named if respell(option).split()[0] not in flags)
    assert unknown == []


def test_text_files_are_read_with_universal_newlines(tmp_path):
    """WikiText-2's test file has CRLF line ends: they read as text mode reads them (the
    perplexities in the README depend on it)."""
    from awq_graph.calib import read_text

    path = _file(tmp_path, "crlf.txt", "one\r\ntwo\rthree\n\u00e9".encode())
    assert read_text(path) == path.read_text(encoding="utf-8") == "one\ntwo\nthree\n\u00e9"


def test_a_compile_killed_with_sigkill_leaves_nothing_the_next_run_does_not_remove(tiny_checkpoint, tmp_path):
    """A killed compile cannot clean up: its hidden sibling of OUT carries its pid, and the next
    compile into OUT removes it once that process is gone (a live one's is left alone)."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "awq_graph.cli", "compile", str(tiny_checkpoint), "-o", str(out), "--n-samples",
           "64", "--seqlen", "64", "--group-size", "16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # until it has made its hidden folder (it writes there only at the end)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = list(tmp_path.glob(".out.tmp-*"))
    assert left and not out.exists()  # what the kill left
    live = tmp_path / ".out.tmp-1-other"  # a running process's (pid 1 runs as long as the machine): kept
    live.mkdir()
    assert main(["compile", str(tiny_checkpoint), "-o", str(out), "--rtn", "--group-size", "16"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [live.name]


def test_a_checkpoint_without_a_tokenizer_compiles_round_to_nearest(tiny_checkpoint, tmp_path, capsys):
    """A weights-only folder (config.json and safetensors): everything that needs no text works."""
    folder = _weights_only(tiny_checkpoint, tmp_path)
    assert main(["compile", str(folder), "-o", str(tmp_path / "out"), "--rtn", "--group-size", "16"]) == 0
    assert "awq-graph: error" not in capsys.readouterr().err
    assert main(["infer-config", str(folder), "--json"]) == 0
    config = _file(tmp_path, "derived.json", capsys.readouterr().out.encode())
    assert main(["check-config", str(folder), str(config), "--verify"]) == 0
    assert main(["check-config", str(folder), "-"]) == 0
    assert "awq-graph: error" not in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # nothing added


def test_a_calibration_longer_than_the_context_is_refused_naming_both_lengths(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", str(tiny_checkpoint), "-o", str(out), "--n-samples", "2", "--seqlen", "600"]) == 1
    err = capsys.readouterr().err
    assert "seqlen 600 (--seqlen) is longer than the model's context of 512 positions" in err and not out.exists()


def test_a_short_calibration_file_says_how_many_samples_it_gave(tiny_checkpoint, tmp_path, capsys):
    text = _file(tmp_path, "short.txt", " ".join(f"word{i}" for i in range(200)).encode())
    out = tmp_path / "out"
    assert main(["compile", str(tiny_checkpoint), "-o", str(out), "--calib", str(text), "--n-samples", "64",
                 "--seqlen", "32", "--group-size", "16"]) == 0
    report = json.loads((out / "report.json").read_text())
    given = report["calibration"]["samples"]
    assert 0 < given < 64
    assert f"gave {given} samples of 32 tokens, fewer than the 64 asked" in capsys.readouterr().err


def test_eval_and_generate_stay_within_the_models_context(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", str(tiny_checkpoint), "-o", str(out), "--rtn", "--group-size", "16"]) == 0
    text = _file(tmp_path, "t.txt", " ".join(f"w{i % 97}" for i in range(3000)).encode())
    capsys.readouterr()
    assert main(["eval", str(out), "--text", str(text), "--max-windows", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 511  # the default window is the context, 512
    assert main(["eval", str(out), "--text", str(text), "--seqlen", "1024"]) == 1
    assert "--seqlen 1024 is longer than the model's context of 512 positions" in capsys.readouterr().err
    assert main(["generate", str(out), "the king of", "--max-new-tokens", "4000", "--greedy"]) == 0
    err = capsys.readouterr().err
    assert "the model's context is 512 positions" in err and "Traceback" not in err, err


def test_infer_config_prints_the_quark_template_for_a_model_type(capsys):
    assert main(["infer-config", "qwen2", "--json"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["model_decoder_layers"] == "model.layers"
    assert {"prev_op": "self_attn.v_proj", "layers": ["self_attn.o_proj"], "inp": "self_attn.o_proj"} in config["scaling_layers"]


def test_check_config_reports_each_fault_and_verifies_the_derived_groups(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_decoder_layers": "model.layers", "scaling_layers": [
        {"prev_op": "mlp.up_proj", "layers": ["mlp.down_proj"], "inp": "mlp.down_proj"},
        {"prev_op": "mlp.gate_proj", "layers": ["mlp.down_proj"], "inp": "mlp.down_proj"}]}))
    assert main(["check-config", "llama", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "scaling_layers[1]: prev_op 'mlp.gate_proj' reaches 'mlp.down_proj' only through 'mlp.act_fn' (silu)" in out
    assert "scaling_layers[0]" not in out
    assert main(["check-config", "gemma", "-", "--verify"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("verify: largest relative logit deviation") and line.endswith("(ok)")
