"""Side-by-side benchmark (not a test): the same AWQ compile by this checkout and by an earlier
commit, each alone in its own process, alternated, so that the machine's drift falls on both.

    python tools/bench_against.py ff2b8f9^ --checkpoint bench/scale/1b-2L --n-samples 16 --seqlen 512 \
        --results tools/results/scale-earlier-side-by-side.json

The earlier commit's tree is written to a scratch folder (``git archive``) and run from there with
its own ``awq_graph`` package (``passes/`` placed as ``awq_graph.passes``, as the install maps it),
with this checkout's virtual environment. Per run: search seconds per decoder layer (report.json's
timings over the checkpoint's decoder layers), wall time, peak RSS (tools/measured.py), the
SHA-256 of the ONNX data written (the same bytes or not) and the load average before it.
Prints a Markdown table and the ratio of the searches; writes the rows to --results.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from measured import file_sha256, run_measured  # noqa: E402


def _tree_of(commit: str, into: Path) -> Path:
    """The commit's files under ``into``, importable as ``awq_graph`` from there."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    if (into / "passes").is_dir() and not (into / "awq_graph" / "passes").exists():
        shutil.copytree(into / "passes", into / "awq_graph" / "passes")
    return into


def _run(label: str, cwd: Path, extra_env: dict, out: Path, layers: int, args) -> dict:
    cmd = [sys.executable, "-m", "awq_graph.cli", "compile", str(args.checkpoint.resolve()),
           "-o", str(out), "--overwrite", "--group-size", str(args.group_size), "--calib", str(args.calib.resolve()),
           "--n-samples", str(args.n_samples), "--seqlen", str(args.seqlen)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **extra_env}
    run = run_measured(cmd, env=env, cwd=cwd)
    proc = run.proc
    row = {"code": label, "rc": proc.returncode, "load_avg": run.load_avg, "wall_s": run.wall_s,
           "peak_rss_gb": run.peak_rss_gb}
    if proc.returncode == 0:
        timings = json.loads((out / "report.json").read_text())["timings_s"]
        row["timings_s"] = timings
        row["search_s_per_layer"] = round(timings["search"] / layers, 2)
        row["data_sha256"] = file_sha256(out / "model.onnx.data")
    else:
        row["error"] = proc.stderr[-500:]
    print(row, flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("commit", help="the earlier code (a commit git knows)")
    p.add_argument("--checkpoint", type=Path, default=REPO / "bench" / "scale" / "1b-2L")
    p.add_argument("--calib", type=Path, default=REPO.parent / "shared" / "data" / "wikitext2-valid-tokenized.txt")
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--results", type=Path, default=REPO / "tools" / "results" / "side-by-side.json")
    args = p.parse_args()
    if not (args.checkpoint / "config.json").is_file():
        p.error(f"--checkpoint {args.checkpoint}: no checkpoint there (tools/random_checkpoint.py 1b "
                f"{args.checkpoint} --layers 2 builds one)")
    layers = json.loads((args.checkpoint / "config.json").read_text())["num_hidden_layers"]  # for seconds per layer
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-against-") as scratch:
        scratch = Path(scratch)
        (scratch / "old").mkdir()
        old = _tree_of(args.commit, scratch / "old")
        for _ in range(args.repeats):
            rows.append(_run(f"now ({head})", REPO, {}, scratch / "out-now", layers, args))
            rows.append(_run(f"{args.commit}", old, {"PYTHONPATH": str(old)}, scratch / "out-old", layers, args))
    now = [r["timings_s"]["search"] for r in rows if r["code"].startswith("now") and r["rc"] == 0]
    then = [r["timings_s"]["search"] for r in rows if not r["code"].startswith("now") and r["rc"] == 0]
    print(f"\nload average {os.getloadavg()[0]:.2f}")
    print("| code | search s/layer | wall s | peak RSS GB | data sha256 | load avg |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['code']} | {r.get('search_s_per_layer', '-')} | {r['wall_s']} | {r['peak_rss_gb']} | "
              f"{(r.get('data_sha256') or '-')[:12]} | {r['load_avg']} |")
    if now and then:
        print(f"search: {sum(then):.1f} s ({args.commit}) against {sum(now):.1f} s (now): {sum(then) / sum(now):.2f}x")
    args.results.write_text(json.dumps({
        "note": f"{args.checkpoint.name}, AWQ {args.n_samples} x {args.seqlen} of {args.calib.name}, "
                f"g{args.group_size}; each compile alone in its process, alternated (tools/bench_against.py)",
        "runs": rows}, indent=1) + "\n")
    print(f"rows in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
