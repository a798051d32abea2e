"""Trust the input: a damaged or mismatched checkpoint is refused by name before any long work,
never compiled with made-up weights; each fault is one ``awq-graph: error:`` line, with nothing
left beside OUT and the input untouched."""
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from awq_graph.cli import main

FAST = ["--rtn", "--group-size", "16"]


def _tree(folder: Path) -> dict:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def _write(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _copy(checkpoint: Path, tmp_path: Path, name: str = "model") -> Path:
    folder = tmp_path / name
    shutil.copytree(checkpoint, folder)
    return folder


def _config(folder: Path, **fields) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _tensors(folder: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = edit(load_file(folder / "model.safetensors"))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _edit_header(folder: Path, edit) -> Path:
    header, data = _header(folder / "model.safetensors")
    edit(header)
    _write(folder / "model.safetensors", header, data)
    return folder


def _sharded_without(folder: Path, tensor: str) -> Path:
    """The checkpoint in shards of ~50 KB, ``tensor`` taken out of its shard (the index still names it)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, max_shard_size="50KB")
    (folder / "model.safetensors").unlink(missing_ok=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][tensor]
    tensors = load_file(shard)
    del tensors[tensor]
    save_file(tensors, shard, metadata={"format": "pt"})
    return folder


def _index_without_shards(folder: Path) -> Path:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    (folder / "model.safetensors").unlink()
    return folder


def _set(name, **fields):
    def edit(header):
        header[name].update(fields)
    return edit


def _drop(name, field):
    def edit(header):
        del header[name][field]
    return edit


UP = "model.layers.0.mlp.up_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"

DAMAGED = {
    "a tensor removed": (lambda f: _tensors(f, lambda t: {k: v for k, v in t.items() if k != DOWN}),
                         f"lacks 1 tensor(s) the model's config needs: '{DOWN}'"),
    "a tensor removed from the shard its index names": (lambda f: _sharded_without(f, DOWN), f"'{DOWN}'"),
    "config says 3 layers, weights hold 2": (lambda f: _config(f, num_hidden_layers=3),
                                             "the config says 3 layers under 'model.layers'"),
    "config says 1 layer, weights hold 2": (lambda f: _config(f, num_hidden_layers=1),
                                            "the config says 1 layer(s) under 'model.layers'"),
    "a float weight stored as I8": (lambda f: _tensors(f, lambda t: {**t, UP: t[UP].to(torch.int8)}),
                                    f"'{UP}'"),
    "a header shape of 64 x 1e9": (lambda f: _edit_header(f, _set(UP, shape=[64, 1_000_000_000])),
                                   "header says shape (64, 1000000000)"),
    "a header dtype its bytes disagree with": (lambda f: _edit_header(f, _set(UP, dtype="F16")), "header is damaged"),
    "a header without data_offsets": (lambda f: _edit_header(f, _drop(UP, "data_offsets")), "data_offsets"),
    "a header shape the config disagrees with": (lambda f: _edit_header(f, _set(UP, shape=[64, 128])),
                                                 f"tensor '{UP}'"),
    "an index with an empty weight_map": (_index_without_shards, "empty weight_map"),
    "a tokenizer.json that is not JSON": (lambda f: (f / "tokenizer.json").write_text("{not json") and f,
                                          "tokenizer.json, tokenizer_config.json) cannot be loaded"),
}


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_or_mismatched_checkpoint_is_refused_by_name_and_left_untouched(
        tiny_checkpoint, tmp_path, capsys, case, stream):
    damage, culprit = DAMAGED[case]
    model = damage(_copy(tiny_checkpoint, tmp_path))
    before = _tree(model)
    out = tmp_path / "out"
    code = main(["compile", str(model), "-o", str(out), *FAST, *([] if stream else ["--no-stream"])])
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("awq-graph:")]
    assert code == 1, err
    assert len(ours) == 1 and ours[0].startswith("awq-graph: error:") and culprit in ours[0], err
    assert "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert _tree(model) == before


def test_eval_of_a_checkpoint_missing_a_tensor_is_refused_not_run_with_random_weights(tiny_checkpoint, tmp_path, capsys):
    model = DAMAGED["a tensor removed"][0](_copy(tiny_checkpoint, tmp_path))
    text = tmp_path / "text.txt"
    text.write_text("the cat of the city is 3 and more text " * 20)
    assert main(["eval", str(model), "--text", str(text)]) == 1
    err = capsys.readouterr().err
    assert f"'{DOWN}'" in err and err.count("awq-graph: error:") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_tensor_the_model_has_no_place_for_is_compiled_around_with_a_warning_naming_it(tiny_checkpoint, tmp_path,
                                                                                         capsys, stream):
    model = _tensors(_copy(tiny_checkpoint, tmp_path), lambda t: {**t, "model.extra.scale": torch.ones(4)})
    out = tmp_path / "out"
    assert main(["compile", str(model), "-o", str(out), *FAST, *([] if stream else ["--no-stream"])]) == 0
    err = capsys.readouterr().err
    assert "awq-graph: warning: 1 tensor(s) in the checkpoint" in err and "'model.extra.scale'" in err, err
    report = json.loads((out / "report.json").read_text())
    assert any("'model.extra.scale'" in w for w in report["warnings"])


# -- the output folder: claimed, never replaced behind the user's back, nothing stale beside it

def _start_compile(checkpoint: Path, out: Path, *extra: str):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "awq_graph.cli", "compile", str(checkpoint), "-o", str(out), "--n-samples", "64",
           "--seqlen", "64", "--group-size", "16", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _when(condition, proc, seconds=180):
    import time

    deadline = time.time() + seconds
    while not condition() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert condition(), "the first compile never got there"


def _beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_a_second_compile_into_an_out_another_is_writing_is_refused_at_once(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    first = _start_compile(tiny_checkpoint, out)
    _when(lambda: (tmp_path / ".out.lock").exists(), first)
    assert main(["compile", str(tiny_checkpoint), "-o", str(out), *FAST, "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert f"another awq-graph compile (pid {first.pid}) is writing it" in err and "Traceback" not in err, err
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert (out / "model.onnx").exists() and _beside(out) == []


def test_an_out_that_appears_during_the_run_is_not_replaced_without_overwrite(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    first = _start_compile(tiny_checkpoint, out)
    _when(lambda: (tmp_path / ".out.lock").exists(), first)
    out.mkdir()
    (out / "theirs.txt").write_text("made by another program meanwhile")
    assert first.wait(timeout=600) == 1
    err = first.stderr.read()
    assert "appeared while compiling" in err and err.count("awq-graph: error:") == 1 and "Traceback" not in err, err
    assert _tree(out) == {"theirs.txt": b"made by another program meanwhile"} and _beside(out) == []


def test_a_symlinked_out_is_written_where_it_points_and_stays_a_link(tiny_checkpoint, tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (target / "old.txt").write_text("the previous output")
    link = tmp_path / "out"
    link.symlink_to(target)
    assert main(["compile", str(tiny_checkpoint), "-o", str(link), *FAST, "--overwrite"]) == 0
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / "model.onnx").exists() and not (target / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real"]  # no .out.old-* nor .real.old-* beside


def test_an_out_linked_to_another_filesystem_is_written_there(tiny_checkpoint, tmp_path):
    """OUT a link into another filesystem (tmpfs): the hidden folder is made beside the link's
    target, so the final rename does not cross filesystems (once an OSError after the search)."""
    import os
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm) here")
    elsewhere = Path(tempfile.mkdtemp(dir=shm))
    try:
        link = tmp_path / "out"
        link.symlink_to(elsewhere / "real")
        assert main(["compile", str(tiny_checkpoint), "-o", str(link), *FAST]) == 0
        assert (elsewhere / "real" / "model.onnx").exists() and link.is_symlink()
        assert sorted(p.name for p in elsewhere.iterdir()) == ["real"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    finally:
        shutil.rmtree(elsewhere)


def test_the_current_folder_as_out_is_refused_before_loading(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", str(work), ".."):
        assert main(["compile", str(tiny_checkpoint), "-o", out, *FAST, "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert "is the current folder" in err and err.count("awq-graph: error:") == 1 and "load" not in err, err
    assert _tree(work) == {"notes.txt": b"mine"} and sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_a_write_that_fails_partway_is_one_line_and_leaves_out_as_it_was(tiny_checkpoint, tmp_path):
    """A file-size limit makes the writes past 64 KiB fail (EFBIG), as a disk filling up past the
    free-space estimate would (ENOSPC): the same OSError, where the files are written."""
    import resource
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier compile's output")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    proc = subprocess.run([sys.executable, "-m", "awq_graph.cli", "compile", str(tiny_checkpoint), "-o", str(out),
                           *FAST, "--overwrite"], capture_output=True, text=True, preexec_fn=limit, timeout=600)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("awq-graph:")]
    assert len(lines) == 1 and lines[0].startswith(f"awq-graph: error: writing {out} failed: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert _tree(out) == {"earlier.txt": b"an earlier compile's output"} and _beside(out) == []


def test_a_stale_claim_of_a_killed_run_is_taken_over(tiny_checkpoint, tmp_path):
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    out = tmp_path / "out"
    (tmp_path / ".out.lock").write_text(f"{gone.pid}\n")
    assert main(["compile", str(tiny_checkpoint), "-o", str(out), *FAST]) == 0
    assert (out / "model.onnx").exists() and _beside(out) == []


# -- the Python API: a wrong argument is one InputError naming it, a bfloat16 model is accepted

def _api_compile(model, calib, out, **options):
    from awq_graph import compile

    return compile(model, calib, out, scheme="uint4_wo_16", n_samples=2, seqlen=16, held_samples=0, **options)


@pytest.mark.parametrize("case, model, calib, culprit", [
    ("float calibration tensor", "tiny", lambda: torch.rand(4, 32), "must hold integer token ids"),
    ("an int for the model", 5, lambda: None, "not a int"),
    ("a meta-device model", "meta", lambda: None, "meta device"),
    ("a calibration that is a number", "tiny", lambda: 3.5, "not a float"),
])
def test_the_api_refuses_what_is_not_a_model_or_token_ids_with_one_error(tmp_path, case, model, calib, culprit):
    from awq_graph.core.errors import InputError
    from conftest import tiny_model

    given = {"tiny": tiny_model, "meta": lambda: tiny_model().to("meta")}.get(model, lambda: model)()
    with pytest.raises(InputError, match=culprit):
        _api_compile(given, calib(), tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_the_api_compiles_a_bfloat16_model_as_its_float32_copy_and_leaves_it_as_it_was(tmp_path):
    """A bfloat16 model (what from_pretrained usually returns) compiles to the same integers as its
    float32 copy given directly; the caller's model keeps its dtype, values and training mode."""
    import numpy as np
    import onnx

    from conftest import tiny_model

    bf16 = tiny_model().to(torch.bfloat16).train()
    before = {k: v.clone() for k, v in bf16.state_dict().items()}
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    _api_compile(bf16, ids, tmp_path / "bf16")
    _api_compile(tiny_model().to(torch.bfloat16).to(torch.float32), ids, tmp_path / "f32")
    assert bf16.training and all(v.dtype == torch.bfloat16 for v in bf16.state_dict().values() if v.is_floating_point())
    assert all(torch.equal(before[k], v) for k, v in bf16.state_dict().items())

    def integers(folder):
        graph = onnx.load(folder / "model.onnx").graph
        return {t.name: onnx.numpy_helper.to_array(t, base_dir=str(folder)) for t in graph.initializer
                if t.data_type == onnx.TensorProto.UINT8}

    a, b = integers(tmp_path / "bf16"), integers(tmp_path / "f32")
    assert a.keys() == b.keys() and len(a) >= 14
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_compile_leaves_the_callers_model_in_its_training_mode(tmp_path):
    from conftest import tiny_model

    model = tiny_model().train()
    _api_compile(model, None, tmp_path / "out", rtn_only=True)
    assert model.training


# -- options and files that used to be ignored, misread or a traceback

def _status(argv: list[str]) -> int:
    """main's exit status, a usage error's (argparse exits with 2) included."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code

def _write_file(tmp_path: Path, name: str, data: bytes) -> str:
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


OPTIONS = {
    "--rtn with --calib (a missing file)": (lambda tmp: ["--rtn", "--calib", str(tmp / "nope.txt")],
                                            "--calib: applies only without --rtn", 2),
    "--no-kv-cache with --generic-decoder": (lambda tmp: ["--rtn", "--no-kv-cache", "--generic-decoder"],
                                             "not allowed with argument --no-kv-cache", 2),
    "a 4-bit head group wider than the hidden size": (
        lambda tmp: ["--rtn", "--quantize-lm-head", "--lm-head-bits", "4", "--lm-head-group-size", "128"],
        "--lm-head-group-size 128 is wider than the head's input (lm_head: 64)", 1),
    "--grid 1000000": (lambda tmp: ["--grid", "1000000"], "--grid 1000000: give 1 to 200", 1),
    "--seed -5": (lambda tmp: ["--seed", "-5"], "--seed: must be an integer of at least 0", 2),
    "a --config file that is a number": (lambda tmp: ["--config", _write_file(tmp, "n.json", b"5")],
                                         "holds a int", 1),
    "a --config that is a folder": (lambda tmp: ["--config", str(tmp)], "is a folder, not a JSON file", 1),
    "a --config that is not UTF-8": (lambda tmp: ["--config", _write_file(tmp, "b.json", b"\xff\xfe{}")],
                                     "is not UTF-8 text", 1),
    "a --config with a non-object entry": (
        lambda tmp: ["--config", _write_file(tmp, "e.json", b'{"model_decoder_layers": "model.layers", '
                                                            b'"scaling_layers": [5]}')],
        "scaling_layers[0] is a int, not an object", 1),
}


@pytest.mark.parametrize("case", list(OPTIONS))
def test_an_option_that_would_be_ignored_or_misread_is_one_line_before_loading(tiny_checkpoint, tmp_path, capsys,
                                                                                case):
    args, culprit, status = OPTIONS[case]
    out = tmp_path / "out"
    code = _status(["compile", str(tiny_checkpoint), "-o", str(out), "--group-size", "16", "--n-samples", "2",
                 "--seqlen", "16", *args(tmp_path)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("awq-graph:")]
    assert code == status and len(lines) == 1 and culprit in lines[0], err
    assert "Traceback" not in err and "Loading" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_an_already_quantized_checkpoint_is_named_as_such(tiny_checkpoint, tmp_path, capsys):
    """Our own --export-hf output (compressed-tensors): the line says it is quantized already,
    not a torch.export failure."""
    hf = tmp_path / "hf"
    assert main(["compile", str(tiny_checkpoint), "-o", str(tmp_path / "first"), *FAST, "--export-hf", str(hf)]) == 0
    capsys.readouterr()
    for stream in ([], ["--no-stream"]):
        assert main(["compile", str(hf), "-o", str(tmp_path / "again"), *FAST, *stream]) == 1
        err = capsys.readouterr().err
        assert "is quantized already" in err and "compressed-tensors" in err and "Traceback" not in err, err


def test_a_config_vocab_smaller_than_the_embedding_is_blamed_on_the_config(tiny_checkpoint, tmp_path, capsys):
    model = _config(_copy(tiny_checkpoint, tmp_path), vocab_size=300)
    assert main(["compile", str(model), "-o", str(tmp_path / "out"), "--group-size", "16", "--n-samples", "2",
                 "--seqlen", "16"]) == 1
    err = capsys.readouterr().err
    assert "'model.embed_tokens.weight'" in err and "(320, 64)" in err and "(300, 64)" in err, err
    assert "tokenizer" not in err


@pytest.fixture(scope="module")
def compiled(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compiled") / "out"
    assert main(["compile", str(tiny_checkpoint), "-o", str(out), *FAST]) == 0
    return out


def _truncate(name, size):
    def damage(folder):
        with open(folder / name, "r+b") as f:
            f.truncate(size)
    return damage


FOLDERS = {
    "model.onnx.data truncated": (_truncate("model.onnx.data", 1000), "is shorter than model.onnx says"),
    "model.onnx.data deleted": (lambda f: (f / "model.onnx.data").unlink(), "model.onnx.data is missing"),
    "model.onnx cut": (_truncate("model.onnx", 500), "model.onnx is not a whole ONNX model"),
    "tokenizer.json gone": (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    "config.json not JSON": (lambda f: (f / "config.json").write_text("{not json"), "config.json is not valid JSON"),
}


@pytest.mark.parametrize("command", ["eval", "generate"])
@pytest.mark.parametrize("case", list(FOLDERS))
def test_a_damaged_compiled_folder_is_one_line_naming_the_file(compiled, tmp_path, capsys, case, command):
    damage, culprit = FOLDERS[case]
    folder = tmp_path / "copy"
    shutil.copytree(compiled, folder)
    damage(folder)
    text = tmp_path / "text.txt"
    text.write_text("the cat of the city is 3 and more text " * 10)
    argv = ["eval", str(folder), "--text", str(text)] if command == "eval" else ["generate", str(folder), "the cat"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("awq-graph:")]
    assert len(lines) == 1 and culprit in lines[0] and "Traceback" not in err, err


def test_generate_chat_without_a_chat_template_says_so(compiled, capsys):
    assert main(["generate", str(compiled), "the cat", "--chat"]) == 1
    err = capsys.readouterr().err
    assert "--chat: the tokenizer in" in err and "has no chat template" in err and "Traceback" not in err, err


def test_a_temperature_too_small_to_divide_by_samples_the_likeliest_token(compiled, capsys):
    assert main(["generate", str(compiled), "the cat", "--temperature", "1e-320", "--max-new-tokens", "4"]) == 0
    sampled = capsys.readouterr().out
    assert main(["generate", str(compiled), "the cat", "--greedy", "--max-new-tokens", "4"]) == 0
    assert sampled == capsys.readouterr().out


@pytest.mark.parametrize("env, culprit", [
    ({"WORLD_SIZE": "2"}, "RANK, MASTER_ADDR, MASTER_PORT are not set: launch it with torchrun"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE=two is not a number of processes"),
])
def test_a_distributed_environment_without_torchrun_is_one_line(tiny_checkpoint, tmp_path, monkeypatch, capsys,
                                                                env, culprit):
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["compile", str(tiny_checkpoint), "-o", str(tmp_path / "out"), *FAST]) == 1
    err = capsys.readouterr().err
    assert err.count("awq-graph: error:") == 1 and culprit in err and "Traceback" not in err, err
