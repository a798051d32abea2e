"""Data-parallel calibration over torch.distributed (gloo, CPU): a compile by two processes
chooses what one process chooses, writes one OUT, and a failure on one rank stops every rank
with the same one-line error.

The two processes are real: ``torchrun`` for the command line, two Python processes over a
process group of their own for the API, two plainly launched ranks (torchrun's environment by
hand) for the failure, each in a working directory of its own, as on two machines."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from awq_graph.cli import main

TORCHRUN = Path(sys.executable).parent / "torchrun"
# 4 x 24 calibration tokens: fewer than down_proj's 128 input channels (its loss in the direct
# form, from each rank's rows) and more than the attention inputs' 64 (the quadratic form from
# the summed H); the loss subsample is all 4 sequences, 2 per rank (the subgraph losses)
FLAGS = ["--n-samples", "4", "--seqlen", "24", "--group-size", "32", "--quantize-lm-head", "--lm-head-bits", "4",
         "--lm-head-group-size", "32", "--grid-screen", "bfloat16"]  # the screen's passes shared out too


def _text_file(folder: Path) -> Path:
    path = folder / "calib.txt"
    path.write_text(" ".join(f"the song of the army is {i} and the cat of the world is {i * 3}" for i in range(300)))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _integers(folder: Path) -> dict[str, np.ndarray]:
    """Every 4-bit weight of the written model, unpacked (low nibble first)."""
    model = onnx.load(folder / "model.onnx")
    out = {}
    for init in model.graph.initializer:
        if init.name.endswith("_Q4") or (init.data_type == onnx.TensorProto.UINT8 and len(init.dims) == 3):
            packed = numpy_helper.to_array(init, base_dir=str(folder))
            out[init.name] = np.stack([packed & 15, packed >> 4], -1).ravel()
    return out


def _choices(report: dict):
    ratios = [(g["layer"], g["prev_op"], g["ratio"], g["loss_form"]) for g in report["groups"]]
    clips = {c["linear"]: (c["clipped"], c["mean_shrink"]) for c in report["clipping"]}
    return ratios, clips


def _perplexity(folder: Path, text: Path, capsys) -> float:
    capsys.readouterr()
    assert main(["eval", str(folder), "--text", str(text), "--seqlen", "48", "--max-windows", "4", "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip())["ppl"]


def _same_choices(one: Path, two: Path) -> float:
    """Asserts the two folders chose the same; returns the largest relative difference of a scale."""
    r1, r2 = (json.loads((f / "report.json").read_text()) for f in (one, two))
    (ratios1, clips1), (ratios2, clips2) = _choices(r1), _choices(r2)
    assert ratios1 == ratios2  # the same ratio in every group, the head's included
    assert clips1.keys() == clips2.keys()
    for name, (clipped, shrink) in clips1.items():  # the same clipping decisions
        assert clips2[name][0] == clipped and abs(clips2[name][1] - shrink) < 1e-6, name
    q1, q2 = _integers(one), _integers(two)
    assert q1.keys() == q2.keys() and q1
    differing = sum(int((q1[k] != q2[k]).sum()) for k in q1)
    # measured: 0 of 94,208 (torchrun, the head's included) and 0 of 73,728 (API) integers differ; the float
    # scales differ in their last bits (the ranks' token sums add up in another order: 2.6e-7 relative on a
    # 4-layer model), which may flip an integer on a rounding boundary
    assert differing <= 1e-3 * sum(v.size for v in q1.values()), differing
    return r2


def test_torchrun_with_two_ranks_chooses_what_one_process_chooses(tiny_checkpoint, tmp_path, capsys):
    calib = _text_file(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["compile", str(tiny_checkpoint), "-o", str(one), "--calib", str(calib), *FLAGS]) == 0
    logs = tmp_path / "logs"
    run = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(_free_port()),
                          "--log-dir", str(logs), "--redirects", "3", "-m", "awq_graph", "compile",
                          str(tiny_checkpoint), "-o", str(two), "--calib", str(calib), *FLAGS],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = _same_choices(one, two)
    assert {k: report["ranks"][k] for k in ("world", "backend", "samples_per_rank")} == {
        "world": 2, "backend": "gloo", "samples_per_rank": [2, 2]}
    # the volume the README computes for large models (tools/bench_scale.py), against what was sent: two
    # layers (hidden 64, MLP 128, 96 tokens: H of o_proj's input; the rows of the other three, 48 per rank,
    # gathered) and the head's group (sum |x|, H and the token counts of its 64-wide input, its grid)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from bench_scale import sent_bytes_per_layer

    summed, gathered = sent_bytes_per_layer(64, 128, 96, ranks=2, passes=0)
    head = 8 * 64 + 8 * 64 * 64 + 2 * 8
    grids = 21 * 8 * sum(g["grid_passes"] for g in report["groups"])  # the screened grid: 2 passes or more a group
    assert all(g["grid_passes"] >= 2 for g in report["groups"])
    sent = report["ranks"]
    assert (sent["bytes_summed"], sent["bytes_gathered"]) == (2 * summed + head + grids, 2 * gathered), (sent, summed)
    assert {g["loss_form"] for g in report["groups"]} == {"forward", "quadratic", "direct"}
    # only rank 0 wrote, and only OUT: no folder of rank 1, no hidden sibling left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "logs", "one", "two"]
    stderr = {p.parent.name: p.read_text() for p in logs.rglob("stderr.log")}
    assert "AWQ search" in stderr["0"] and "AWQ search" not in stderr["1"]  # a progress bar on rank 0 only
    assert "wrote" in next(logs.rglob("0/stdout.log")).read_text()
    ppl1, ppl2 = _perplexity(one, calib, capsys), _perplexity(two, calib, capsys)
    assert abs(ppl2 / ppl1 - 1) < 0.005, (ppl1, ppl2)  # measured: 342.38257 and 342.38251 (-1.6e-7)


API_RANK = """
import sys, torch.distributed as dist
from datetime import timedelta
import awq_graph


rank, port, model, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=120))
dist.init_process_group("gloo", store=store, rank=rank, world_size=2)  # the user's own launcher
result = awq_graph.compile(model, "self", out, ranks=awq_graph.Ranks(dist.group.WORLD, store), n_samples=4, seqlen=24,
                           scheme="uint4_wo_32")
print(rank, len(result.files))
dist.destroy_process_group()
"""


def test_the_api_takes_an_initialized_process_group_and_samples_self_calibration_once(tiny_checkpoint, tmp_path):
    import awq_graph

    one, two = tmp_path / "one", tmp_path / "two"
    awq_graph.compile(tiny_checkpoint, "self", one, n_samples=4, seqlen=24, scheme="uint4_wo_32")
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(API_RANK))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(port), str(tiny_checkpoint), str(two)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    files = dict(o[0].split() for o in outs)
    assert int(files["0"]) > 0 and files["1"] == "0"  # rank 0 wrote OUT, rank 1 returned no files
    # rank 0 sampled the text once and sent it: the same tokens as one process with the same seed
    assert json.loads((two / "report.json").read_text())["calibration_source"] == "self"
    _same_choices(one, two)


@pytest.mark.parametrize("rank1_has, line", [
    (None, "rank 1: calibration file calib.txt does not exist (give a .txt or .jsonl file, or 'self')"),
    ("other text", "rank 1: calibration from calib.txt gave other tokens than rank 0's: every rank must read the "
                   "same calibration (the same file, or --calib self)"),
])
def test_a_rank_that_reads_no_or_other_calibration_stops_every_rank_with_one_line(tiny_checkpoint, tmp_path,
                                                                                   rank1_has, line):
    """Rank 1 runs in another working directory (as on another machine), where the relative path
    calib.txt is missing or holds other text; both ranks print the same one line, naming rank 1."""
    here, there = tmp_path / "node0", tmp_path / "node1"
    here.mkdir(), there.mkdir()
    _text_file(here)
    if rank1_has:
        (there / "calib.txt").write_text(" ".join(f"{rank1_has} {i}" for i in range(400)))
    out = tmp_path / "out"
    port = _free_port()
    procs = []
    for rank, cwd in enumerate((here, there)):
        env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        procs.append(subprocess.Popen([sys.executable, "-m", "awq_graph", "compile", str(tiny_checkpoint), "-o",
                                       str(out), "--calib", "calib.txt", "--n-samples", "4", "--seqlen", "24"],
                                      cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [1, 1]
    for stdout, stderr in results:
        assert stderr.strip().splitlines() == [f"awq-graph: error: {line}"], stderr[-2000:]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["node0", "node1"]


def test_a_rank_stopped_during_the_search_stops_the_other_with_its_line(tmp_path):
    """Rank 1 gets SIGTERM in the middle of the search: rank 0, waiting for it in a collective,
    stops at once with rank 1's line (left in the rendezvous store), and leaves no OUT."""
    import signal
    import time

    from conftest import tiny_model, tiny_tokenizer

    model = tmp_path / "model"  # wide and deep enough for a search of several seconds
    tiny_model(num_hidden_layers=8, hidden_size=256, intermediate_size=512, head_dim=64).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    _text_file(tmp_path)
    out = tmp_path / "out"
    env = _env(PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, "-m", "awq_graph", "compile", str(model), "-o", str(out), "--calib",
                               str(tmp_path / "calib.txt"), "--n-samples", "16", "--seqlen", "64"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for r in (0, 1)]
    os.set_blocking(procs[0].stderr.fileno(), False)
    seen, deadline = b"", time.monotonic() + 300
    while b"AWQ search" not in seen and time.monotonic() < deadline and procs[0].poll() is None:
        seen += procs[0].stderr.read() or b""
        time.sleep(0.05)
    assert b"AWQ search" in seen, seen[-2000:]
    procs[1].send_signal(signal.SIGTERM)
    rest = [p.communicate(timeout=120) for p in procs]
    err0 = (seen + (rest[0][1] or b"")).decode().split("\r")[-1].strip().splitlines()[-1]
    err1 = rest[1][1].decode().strip().splitlines()[-1]
    assert err1 == "awq-graph: interrupted (SIGTERM); nothing was written", rest[1][1][-2000:]
    assert err0 == "awq-graph: error: rank 1: interrupted (SIGTERM)", err0
    assert procs[0].returncode == 1 and procs[1].returncode == 128 + signal.SIGTERM
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def _launch(rank: int, model: Path, out: Path, port: int, cwd: Path, *extra: str, **env) -> subprocess.Popen:
    environment = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                       WORLD_SIZE="2", PYTHONPATH=str(Path(__file__).resolve().parents[1]), **env)
    return subprocess.Popen([sys.executable, "-m", "awq_graph", "compile", str(model), "-o", str(out), *extra],
                            cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("other, line", [
    ({"seed": 1}, "rank 1: its model or options differ from rank 0's (its weights' values (another checkpoint of "
                  "the same shape))"),
    ({"intermediate_size": 96}, "rank 1: its model or options differ from rank 0's (its config.json; its tensors' "
                                "names, shapes or dtypes; its weights' values"),
])
def test_a_rank_given_another_model_is_named_on_every_rank_before_the_search(tmp_path, other, line):
    """Rank 1 reads model/ in its own working directory (as on another machine), where it is another
    checkpoint: of the same shape (other values; once summed into rank 0's statistics) or of another
    shape (once an abort inside a collective). Both ranks print one line naming rank 1, and nothing
    is left beside OUT."""
    from conftest import tiny_model, tiny_tokenizer

    here, there = tmp_path / "node0", tmp_path / "node1"
    for node, fields in ((here, {}), (there, other)):
        seed = fields.get("seed", 0)
        tiny_model(seed=seed, **{k: v for k, v in fields.items() if k != "seed"}).save_pretrained(node / "model")
        tiny_tokenizer().save_pretrained(node / "model")
        _text_file(node)
    out = tmp_path / "out"
    port = _free_port()
    procs = [_launch(rank, Path("model"), out, port, cwd, "--calib", "calib.txt", "--n-samples", "4", "--seqlen", "24",
                     "--group-size", "32") for rank, cwd in enumerate((here, there))]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [1, 1], [r[1][-2000:] for r in results]
    for _, stderr in results:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"awq-graph: error: {line}"), stderr[-2000:]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["node0", "node1"]


def test_a_rank_whose_peers_never_come_gives_up_after_the_timeout_with_one_line(tiny_checkpoint, tmp_path):
    import time

    out = tmp_path / "out"
    start = time.monotonic()
    proc = _launch(0, tiny_checkpoint, out, _free_port(), tmp_path, "--rtn", AWQ_GRAPH_RANK_TIMEOUT="3")
    _, stderr = proc.communicate(timeout=120)
    took = time.monotonic() - start
    assert proc.returncode == 1 and took < 60, (took, stderr[-2000:])
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("awq-graph: error: rank 0: the 2 ranks did not all join at "
                                                   "127.0.0.1:") and "within 3 s" in lines[0], stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("rank, signum", [(0, "SIGTERM"), (1, "SIGINT")])
def test_a_rank_waiting_for_peers_that_never_come_answers_a_signal_at_once(tiny_checkpoint, tmp_path, rank, signum):
    """Rank 0 waits for rank 1 to join its store; rank 1 waits for rank 0's store to exist: either
    ends within seconds of SIGTERM or Ctrl-C, with the one line of an interrupted run."""
    import signal
    import time

    proc = _launch(rank, tiny_checkpoint, tmp_path / "out", _free_port(), tmp_path, "--rtn")
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.monotonic() + 120
    while "libgloo" not in maps.read_text() and "torch_cpu" not in maps.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)  # until torch is loaded: its import holds a signal back until it ends
    time.sleep(3)  # into the rendezvous
    assert proc.poll() is None
    sent = time.monotonic()
    proc.send_signal(getattr(signal, signum))
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10  # measured 0.02 s
    assert proc.returncode == 128 + getattr(signal, signum), stderr[-2000:]
    assert stderr.strip().splitlines() == [f"awq-graph: interrupted ({signum}); nothing was written"], stderr[-2000:]
