"""Interruptions, the output folder's life and the caller's state: a compile that is stopped at any
moment leaves OUT as it was and nothing beside it, says so on one line, and a library call leaves
the caller's random state alone."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from awq_graph.cli import main


def _siblings(folder: Path, out: Path) -> list[str]:
    """What sits beside OUT under its name (hidden tmp/old/probe folders)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{out.name}."))


def _tree(folder: Path) -> dict:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def _strict_json(path: Path):
    """json.loads would take NaN and Infinity, which are not JSON: refuse them."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def _start_compile(checkpoint: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "awq_graph.cli", "compile", str(checkpoint), "-o", str(out), "--n-samples", "64",
           "--seqlen", "64", "--group-size", "16", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _when_said(proc: subprocess.Popen, words: bytes) -> bytes:
    """Waits until the compile's stderr shows ``words`` (a progress bar's name); returns what it read."""
    os.set_blocking(proc.stderr.fileno(), False)
    seen, deadline = b"", time.time() + 180
    while words not in seen and time.time() < deadline and proc.poll() is None:
        seen += proc.stderr.read() or b""
        time.sleep(0.01)
    os.set_blocking(proc.stderr.fileno(), True)
    return seen


def _when_writing(out: Path):
    """Waits until the compile has made its hidden folder (it writes there only at the end)."""
    deadline = time.time() + 180
    while not list(out.parent.glob(f".{out.name}.tmp-*")) and time.time() < deadline:
        time.sleep(0.02)


@pytest.mark.parametrize("signum, moment", [
    (signal.SIGINT, 0.5),        # Ctrl-C while torch is still importing (its C++ part calls back into Python)
    (signal.SIGINT, 1.0),
    (signal.SIGTERM, 2.0),
    (signal.SIGTERM, b"self-calibration"),  # what kill and timeout send, while calibration text is sampled
    (signal.SIGHUP, "writing"),  # the terminal closed, while the ONNX files are being written
    (signal.SIGTERM, "writing"),
])
def test_a_signal_at_any_moment_is_one_line_and_leaves_out_as_it_was(tiny_checkpoint, tmp_path, signum, moment):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier compile's output")
    before = _tree(out)
    proc = _start_compile(tiny_checkpoint, out, "--overwrite")
    seen = b""
    if moment == "writing":
        _when_writing(out)
    elif isinstance(moment, bytes):
        seen = _when_said(proc, moment)
    else:
        time.sleep(moment)
    proc.send_signal(signum)
    err = (seen + proc.communicate(timeout=120)[1]).decode()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    assert err.strip().splitlines()[-1] == f"awq-graph: interrupted ({name}); nothing was written", err
    assert "Traceback" not in err and err.count("awq-graph:") == 1, err
    assert _tree(out) == before  # the earlier output, byte for byte
    assert _siblings(tmp_path, out) == []


def test_a_kill_between_the_two_renames_is_undone_by_the_next_compile(tiny_checkpoint, tmp_path):
    """The one moment OUT is missing: the earlier OUT set aside as .OUT.old-PID, the new one not yet
    in place. The next compile puts the earlier one back before it starts."""
    from awq_graph.outdir import remove_stale

    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has ended
    aside = tmp_path / f".out.old-{dead}"
    aside.mkdir()
    (aside / "earlier.txt").write_text("an earlier compile's output")
    assert remove_stale(out) == [aside]
    assert (out / "earlier.txt").read_text() == "an earlier compile's output"
    assert _siblings(tmp_path, out) == []


def test_an_output_put_back_after_a_kill_is_not_replaced_without_overwrite(tiny_checkpoint, tmp_path, capsys):
    """The set-aside OUT is restored before OUT is checked, so a compile without --overwrite
    refuses it like any existing OUT (it used to be restored at the end, then replaced)."""
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    aside = tmp_path / f".out.old-{dead}"
    aside.mkdir()
    (aside / "earlier.txt").write_text("an earlier compile's output")
    assert main(["compile", str(tiny_checkpoint), "-o", str(out), "--rtn", "--group-size", "16"]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    assert _tree(out) == {"earlier.txt": b"an earlier compile's output"} and _siblings(tmp_path, out) == []


def test_the_package_imports_without_torch():
    """Ctrl-C during the command's start is a one-line interruption only if the heavy imports
    happen inside main(): importing the command line and the package must not load torch."""
    probe = "import sys, awq_graph, awq_graph.cli; print(sorted({'torch', 'transformers', 'onnx'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
    import awq_graph

    assert awq_graph.compile.__module__ == "awq_graph.pipeline.driver"  # the public names still resolve


def test_compile_leaves_the_callers_random_state_alone(tiny_checkpoint, tmp_path):
    """Self calibration samples with the global RNG inside compile(); the caller's stream goes on
    as if compile had not run."""
    from awq_graph import compile

    torch.manual_seed(1234)
    state = torch.get_rng_state()
    compile(tiny_checkpoint, "self", tmp_path / "out", n_samples=2, seqlen=16, scheme="uint4_wo_16")
    assert torch.equal(torch.get_rng_state(), state)


def test_a_warning_is_given_before_the_search_not_after(tiny_checkpoint, tmp_path):
    """Group size 128 is wider than the 64-wide inputs of the tiny Llama's attention and MLP
    projections (down_proj, 128 wide, still fits): said before the calibration search starts."""
    from awq_graph import compile

    events = []
    compile(tiny_checkpoint, "self", tmp_path / "out", n_samples=2, seqlen=16, scheme="uint4_wo_128",
            warn=lambda message: events.append(("warning", message)),
            progress=lambda it, desc, total: events.append(("progress", desc)) or it)
    warnings = [i for i, (kind, text) in enumerate(events) if kind == "warning" and "narrower than the group" in text]
    search = [i for i, (kind, text) in enumerate(events) if kind == "progress" and text == "AWQ search"]
    assert warnings and search and warnings[0] < search[0], events
    report = _strict_json(tmp_path / "out" / "report.json")
    assert any("narrower than the group size 128" in w for w in report["warnings"])


def test_inputs_not_a_multiple_of_the_group_are_warned_of_with_the_padding_the_file_holds(tmp_path):
    """A 96-wide hidden size at group 64 (SmolLM2's 576 at 128): MatMulNBits pads each row's last
    group; the warning's share is what the written integers hold, counted from the file's shapes."""
    import onnx

    from awq_graph import compile
    from conftest import tiny_model

    warnings = []
    model = tiny_model(hidden_size=96, intermediate_size=192, head_dim=24)
    compile(model, None, tmp_path / "out", rtn_only=True, scheme="uint4_wo_64", warn=warnings.append)
    (said,) = [w for w in warnings if "not a multiple of the group size 64" in w]
    assert "`group_size=32` divides every input" in said
    graph = onnx.load(tmp_path / "out" / "model.onnx", load_external_data=False).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    written = padding = 0
    for node in graph.node:
        if node.op_type == "MatMulNBits" and node.input[1] in shapes and not node.name.startswith("lm_head"):
            attrs = {a.name: a.i for a in node.attribute}
            n, blocks, _ = shapes[node.input[1]]
            written += n * blocks * attrs["block_size"]
            padding += n * (blocks * attrs["block_size"] - attrs["K"])
    share = float(said.split("last group, ")[1].split("%")[0])
    assert padding and abs(share - 100 * padding / written) < 0.05, (share, padding / written)  # measured: 20.6%


def test_the_match_passes_over_the_weights_show_progress_to_the_last_parameter(tiny_checkpoint, tmp_path):
    """The analysis and the verification each read every parameter once (from disk, for a large
    checkpoint: a minute each for 8B): each is a bar that ends at its total."""
    from awq_graph import compile

    bars = {}

    def progress(it, desc, total):
        bars[desc] = [total, 0]
        for item in it:
            bars[desc][1] += 1
            yield item

    compile(tiny_checkpoint, "self", tmp_path / "out", n_samples=2, seqlen=16, scheme="uint4_wo_32", progress=progress)
    report = _strict_json(tmp_path / "out" / "report.json")
    assert report["weights"]["streamed"], report["weights"]
    analysed, verified = bars["analysing the graph"], bars["verifying the groups"]
    assert analysed[0] == verified[0] > 20 and analysed == [analysed[0]] * 2 and verified == [verified[0]] * 2, bars
    assert list(bars).index("verifying the groups") < list(bars).index("AWQ search"), list(bars)


def test_an_output_on_a_filesystem_that_refuses_folders_fails_before_loading(tiny_checkpoint, capsys):
    if not Path("/sys").is_dir():
        pytest.skip("needs Linux's /sys, where no one may create folders")
    assert main(["compile", str(tiny_checkpoint), "-o", "/sys/awq-graph-out", "--rtn"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "awq-graph: error: cannot create folders beside /sys/awq-graph-out (/sys: Operation not permitted)"


def test_an_output_on_a_disk_too_full_for_it_fails_before_the_calibration_naming_the_folder_and_sizes(
        tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(real(path).total, real(path).used, 1000))
    out = tmp_path / "out"
    assert main(["compile", str(tiny_checkpoint), "-o", str(out), "--n-samples", "2", "--seqlen", "16"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"awq-graph: error: {tmp_path} has 0.00 GiB free, and the compile writes at least "), err
    assert f"({out}: the int4 integers, " in err and "choose another folder" in err and "\n" not in err, err
    assert "self-calibration" not in err  # refused before the calibration text is sampled (the first long work)
    assert not out.exists() and _siblings(tmp_path, out) == []


def test_eval_of_a_compiled_folder_that_lost_its_model_says_so(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", str(tiny_checkpoint), "-o", str(out), "--rtn", "--group-size", "16"]) == 0
    (out / "model.onnx").unlink()
    text = tmp_path / "t.txt"
    text.write_text("the king of the city")
    capsys.readouterr()
    for argv in (["eval", str(out), "--text", str(text)], ["generate", str(out), "the king"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.strip() == f"awq-graph: error: {out} is a compiled awq-graph folder (report.json) without its model.onnx"


def test_eval_names_its_text_file_as_the_flag(tiny_checkpoint, tmp_path, capsys):
    assert main(["eval", str(tiny_checkpoint), "--text", str(tmp_path / "missing.txt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"awq-graph: error: --text file {tmp_path / 'missing.txt'} does not exist"), err


def test_a_gpt2_calibration_beyond_its_positions_is_refused_naming_both(tmp_path):
    """GPT-2 calls its context n_positions; a longer calibration would fail inside the position
    lookup, as a failed graph node."""
    from awq_graph import InputError, compile
    from conftest import tiny_model

    model = tiny_model("gpt2", max_position_embeddings=32)  # GPT2Config maps it to n_positions
    assert model.config.n_positions == 32
    ids = torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match="seqlen 48 .* longer than the model's context of 32 positions"):
        compile(model, ids, tmp_path / "out", n_samples=4, seqlen=48, scheme="uint4_wo_16")
    assert not (tmp_path / "out").exists()


def test_calibration_ids_beyond_the_token_table_are_named_with_their_source(tmp_path, capsys):
    """A tokenizer of another model (SmolLM2's 49152 ids on a 320-token model) used to end in
    'index out of range in self' from the embedding node."""
    from conftest import tiny_model

    from awq_graph import InputError, compile

    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    ids[2, 5] = 4000
    with pytest.raises(InputError, match="calibration from tensors holds token id 4000, outside the model's token "
                                         "table of 320 rows"):
        compile(tiny_model(), ids, tmp_path / "out", n_samples=4, seqlen=32, scheme="uint4_wo_16")
    assert not (tmp_path / "out").exists()


def test_a_signal_python_wrapped_in_another_exception_is_still_the_signal():
    """Ctrl-C landing in a class body's ``__set_name__`` while torch imports reaches the CLI as a
    RuntimeError whose cause is our Interrupted (seen once in CI, from the first case of the test
    above): it ends the run as that signal does, not with a traceback; a plain error stays an error."""
    from awq_graph.interrupt import Interrupted, signal_behind

    class Field:
        def __set_name__(self, owner, name):
            raise Interrupted(signal.SIGINT)

    with pytest.raises(RuntimeError) as wrapped:
        type("CategoryDict", (), {"values": Field()})  # Python wraps what __set_name__ raises
    assert signal_behind(wrapped.value) == signal.SIGINT
    assert signal_behind(RuntimeError("a bug")) is None


def test_a_signal_while_torch_imports_waits_for_the_import_to_finish():
    """A signal inside ``signals_held`` (the CLI imports torch there) is raised when the block ends,
    not inside it: torch's C++ initialisation calls back into Python, and an exception raised in
    such a callback aborted the process in CI (SIGABRT, "terminate called after throwing an instance
    of 'pybind11::error_already_set'") instead of ending it with one line."""
    from awq_graph import interrupt

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    hook = sys.unraisablehook
    interrupt.catch_signals()
    finished = []
    try:
        with pytest.raises(interrupt.Interrupted) as stop:
            with interrupt.signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler has run by now: Python calls it between bytecodes
                finished.append("the held block ran to its end")
        assert stop.value.signum == signal.SIGTERM and finished == ["the held block ran to its end"]
    finally:
        interrupt.forget_signals()
        sys.unraisablehook = hook
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def test_a_signal_the_moment_the_samplers_folder_is_made_leaves_nothing_beside_out(tmp_path, monkeypatch):
    """--calib self writes its sampler beside OUT as a hidden folder: a SIGTERM arriving as the
    folder is made (CI saw one between its creation and the sampler's clean-up) still removes it."""
    import tempfile

    from awq_graph import interrupt
    from awq_graph.pipeline.calibration import sampler_scratch

    made, mkdtemp = [], tempfile.mkdtemp

    def mkdtemp_then_signal(*args, **kwargs):
        made.append(mkdtemp(*args, **kwargs))
        os.kill(os.getpid(), signal.SIGTERM)  # delivered before the caller has the folder's name
        time.sleep(0.05)
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp_then_signal)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    hook = sys.unraisablehook
    interrupt.catch_signals()
    try:
        with pytest.raises(interrupt.Interrupted):
            with sampler_scratch(tmp_path / "out", leader=True):
                pytest.fail("the signal is raised before the sampler starts")
    finally:
        interrupt.forget_signals()
        sys.unraisablehook = hook
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert made and list(tmp_path.iterdir()) == []


def test_a_decoder_another_tool_wrote_is_named_as_such_not_a_traceback(tmp_path, capsys):
    """onnxruntime-genai's builder writes its cache as (batch, kv_heads, past, 'kv_cache_dim') and takes
    no position_ids: `awq-graph generate` on such a folder says what it is in one line."""
    import onnx
    from onnx import TensorProto, helper

    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", 2, "past", "kv_cache_dim"])
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", 10])
    present = helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", 2, "total", "kv_cache_dim"])
    graph = helper.make_graph([helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT),
                               helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"])],
                              "foreign", [ids, past], [logits, present])
    folder = tmp_path / "foreign"
    folder.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "model.onnx")
    from awq_graph.runtime import CompiledModel
    from awq_graph.core.errors import InputError

    with pytest.raises(InputError, match="is not a KV-cache decoder awq-graph wrote: its past_key_values.0.key"):
        CompiledModel(folder)
    assert main(["generate", str(folder), "hello", "--max-new-tokens", "2"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a KV-cache decoder awq-graph wrote" in err[0], err
