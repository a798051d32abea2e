"""Memory benchmark (not a test): compile a given checkpoint (a folder or a .gguf) and report its peak
RSS, in all (tools/measured.py, as /usr/bin/time -v measures it) and at the end of each stage
(report.json's peak_rss_mb_after), to see where a compile's memory goes.

    python tools/bench_memory.py bench/qwen/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --modes rtn

AWQ compiles calibrate on WikiText-2 validation (--data) with --n-samples x --seqlen. Figures go to
tools/results/memory-NAME.json; a Markdown table is printed with the load average (peak RSS does not
depend on the load; the seconds do).
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
    p.add_argument("model", type=Path)
    p.add_argument("--modes", nargs="+", default=["rtn"], choices=["rtn", "awq"])
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=REPO / "bench" / "memory")
    args = p.parse_args()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    args.work.mkdir(parents=True, exist_ok=True)
    name = args.model.name.removesuffix(".gguf")
    rows = []
    for mode in args.modes:
        out = args.work / f"{mode}-{name}"
        cmd = [sys.executable, "-m", "awq_graph.cli", "compile", str(args.model), "-o", str(out), "--overwrite"]
        cmd += ["--rtn"] if mode == "rtn" else ["--calib", str(args.data / "wikitext2-valid-tokenized.txt"),
                                               "--n-samples", str(args.n_samples), "--seqlen", str(args.seqlen)]
        run = run_measured(cmd, env=env)
        row = {"model": name, "mode": mode, "rc": run.proc.returncode, "wall_s": run.wall_s,
               "peak_rss_gb": run.peak_rss_gb, "load_avg": run.load_avg}
        if run.proc.returncode == 0:
            report = json.loads((out / "report.json").read_text())
            row.update(peak_rss_mb_after=report["peak_rss_mb_after"], timings_s=report["timings_s"],
                       calibration=report["calibration"])
        else:
            row["error"] = run.proc.stderr.strip().splitlines()[-1:]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    results = REPO / "tools" / "results" / f"memory-{name}.json"
    results.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"load average {os.getloadavg()[0]:.2f}; rows in {results}")
    stages = list(rows[0].get("peak_rss_mb_after", {}))
    print("| model | mode | peak RSS | " + " | ".join(f"after {s}" for s in stages) + " | seconds |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in stages) + " | --- |")
    for r in rows:
        after = r.get("peak_rss_mb_after", {})
        print(f"| {r['model']} | {r['mode']} | {r['peak_rss_gb']} GB | "
              + " | ".join(f"{after.get(s, 0) / 1024:.2f} GB" for s in stages) + f" | {r['wall_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
