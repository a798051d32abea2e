"""Self-calibration with the compile's own 8-bit decoder (awq_graph.sampling): deterministic for a
seed, other for another seed, shared out among ranks so that their shares together are one
process's set, and within the streamed compile's memory: it does not grow with depth."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_model, tiny_tokenizer

sys.path.insert(0, str(REPO / "tools"))
from random_checkpoint import build  # noqa: E402

SAMPLE = """
import sys, torch
from pathlib import Path
from awq_graph.emit import plan_graph
from awq_graph.export import export_model
from awq_graph.load import open_skeleton
from awq_graph.sampling import sampled_ids

folder, seed, out, batch = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
ranks = None
if len(sys.argv) > 5:  # rank, port: two processes over gloo
    import torch.distributed as dist
    from datetime import timedelta
    import awq_graph
    rank, port = int(sys.argv[5]), int(sys.argv[6])
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    ranks = awq_graph.Ranks(dist.group.WORLD, store)
skeleton, _ = open_skeleton(folder)
gm = export_model(skeleton.model, skeleton=skeleton, seqlen=24)
plan = plan_graph(gm, skeleton.model, True, 16)
scratch = out.parent / (out.name + ".scratch")
scratch.mkdir()
ids = sampled_ids(gm, skeleton.model, plan, __import__("awq_graph").core.numerics.QuantScheme(4, 16), 1, 6, 24, seed,
                  scratch, ranks=ranks, batch=batch)
assert not scratch.exists()
torch.save(ids, out)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sampling") / "model"
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _sample(checkpoint: Path, tmp_path: Path, seed: int, name: str, batch: int = 64, rank_port=None):
    script = tmp_path / "sample.py"
    script.write_text(textwrap.dedent(SAMPLE))
    out = tmp_path / f"{name}.pt"
    extra = [str(v) for v in rank_port] if rank_port else []
    return subprocess.Popen([sys.executable, str(script), str(checkpoint), str(seed), str(out), str(batch), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}), out


def _done(proc):
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]


def test_the_sampled_ids_are_the_same_for_a_seed_and_differ_between_seeds(checkpoint, tmp_path):
    runs = {name: _sample(checkpoint, tmp_path, seed, name) for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    for proc, _ in runs.values():
        _done(proc)
    a, b, c = (torch.load(out) for _, out in runs.values())
    assert a.shape == (6, 24) and a.dtype == torch.long and 0 <= int(a.min()) and int(a.max()) < 320
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.5  # measured 0.9 of the tokens differ
    assert (a[:, 0] == 1).all() and len(set(a[:, 1].tolist())) > 1  # BOS, then a random token apart


def test_two_ranks_sample_disjoint_shares_that_together_are_what_one_process_samples(checkpoint, tmp_path):
    """Batches of 2 samples: rank 0 samples batches 0 and 2, rank 1 batch 1 (each with its own
    generator, seeded by the batch), and both return the six rows of one process."""
    one, one_out = _sample(checkpoint, tmp_path, 0, "one", batch=2)
    _done(one)
    port = _free_port()
    ranks = [_sample(checkpoint, tmp_path, 0, f"rank{r}", batch=2, rank_port=(r, port)) for r in (0, 1)]
    for proc, _ in ranks:
        _done(proc)
    single = torch.load(one_out)
    for _, out in ranks:
        assert torch.equal(torch.load(out), single)


PEAK = """
import resource, sys
from awq_graph import compile
compile(sys.argv[1], "self", sys.argv[2], n_samples=4, seqlen=64, overwrite=True, rtn_only=False, grid_points=2,
        held_samples=0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def test_self_calibration_memory_does_not_grow_with_depth(tmp_path):
    """Compiles with --calib self of one width (63 MB of float32 weights per layer) at 2 and 4 layers,
    each in its own process (peak RSS): the sampler's 8-bit decoder is written from the streamed
    program, so 2 more layers cost well under their float32 (the old sampler loaded the whole model)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2", "PYTHONPATH": str(REPO)}
    peak = {}
    for layers in (2, 4):
        folder = build(tmp_path / f"ck{layers}", "wide", layers=layers, tokenizer=tiny_tokenizer())
        run = subprocess.run([sys.executable, "-c", PEAK, str(folder), str(tmp_path / "out")], capture_output=True,
                             text=True, cwd=REPO, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        peak[layers] = float(run.stdout.split()[-1])
    growth, two_layers = peak[4] - peak[2], 2 * 63.0
    print(f"peak RSS MB: {peak}; 2 more layers: +{growth:.0f} MB (their float32 weights: {two_layers:.0f} MB)")
    assert growth < 0.4 * two_layers, peak
