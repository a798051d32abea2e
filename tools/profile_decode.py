"""Where a decode step's time goes (not a test): onnxruntime's own profiler over the decode steps of a
compiled folder, summed per operator type, beside the step's wall time and the bandwidth bound (the bytes of the weights a step reads over
a measured copy bandwidth).

    python tools/profile_decode.py OUT [--threads 2] [--prompt-tokens 512] [--new-tokens 64] [--spin]

The session is the one CompiledModel runs (same options, prefill then one token per step against the
cache, bound in place); onnxruntime writes a JSON trace, of which the decode steps are read: per op
type, microseconds per step and share.
Figures go to tools/results/profile_decode.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes per second of a large memory copy (read + write counted once each)."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def read_per_step(graph) -> int:
    """Bytes of the initializers a decode step reads whole: those of the matrix products (MatMulNBits,
    MatMul, QMoE's banks: every expert bank counted, an upper bound for top-k routing); a token
    table's lookup reads one row and is left out."""
    sizes = {}
    for t in graph.initializer:
        location = {e.key: e.value for e in t.external_data}
        sizes[t.name] = int(location["length"]) if "length" in location else len(t.raw_data)
    read = {i for n in graph.node if n.op_type in ("MatMulNBits", "MatMul", "QMoE") for i in n.input}
    return sum(size for name, size in sizes.items() if name in read)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--spin", action="store_true", help="worker threads spin between ops")
    p.add_argument("--out", type=Path, default=REPO / "tools" / "results" / "profile_decode.json")
    args = p.parse_args()

    import onnx
    import onnxruntime as ort

    from awq_graph import runtime

    def profiled_session(path, threads=None, provider="cpu", spinning=False, prepack=True):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads or 0
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        opts.enable_profiling = True
        opts.profile_file_prefix = str(REPO / "bench" / "profile_decode")
        return ort.InferenceSession(str(Path(path) / "model.onnx"), opts, providers=["CPUExecutionProvider"])

    runtime.session = profiled_session  # the same CompiledModel loop, over a profiling session
    model = runtime.CompiledModel(args.folder, threads=args.threads, spinning=args.spin)
    prompt = [int(x) for x in np.random.default_rng(0).integers(100, 20000, args.prompt_tokens)]
    logits, advance = model.decoding(prompt, args.new_tokens)
    steps = []
    for _ in range(args.new_tokens - 1):
        t = time.perf_counter()
        logits = advance(int(np.argmax(logits)))
        steps.append(time.perf_counter() - t)
    trace = Path(model.session.end_profiling())
    events = json.loads(trace.read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    decode_runs = runs[-(args.new_tokens - 1):]
    first, last = decode_runs[0]["ts"], decode_runs[-1]["ts"] + decode_runs[-1]["dur"]
    per_op = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and first <= e["ts"] <= last:
            per_op[e["args"]["op_name"]] += e["dur"]
    n = len(decode_runs)
    run_us = sum(r["dur"] for r in decode_runs) / n
    step_ms = 1000 * float(np.median(steps))
    graph = onnx.load(args.folder / "model.onnx", load_external_data=False).graph
    weight_bytes = read_per_step(graph)
    bandwidth = copy_bandwidth()
    rows = sorted(((op, us / n) for op, us in per_op.items()), key=lambda r: -r[1])
    kernel_us = sum(us for _, us in rows)
    print(f"{args.folder}: {args.threads} threads, spinning {'on' if args.spin else 'off'}, "
          f"load average {os.getloadavg()[0]:.2f}, {n} decode steps after a {args.prompt_tokens}-token prompt\n")
    print("| op type | us per step | share of kernel time |")
    print("|---|---|---|")
    for op, us in rows:
        print(f"| {op} | {us:.0f} | {us / kernel_us:.1%} |")
    bound_ms = 1000 * weight_bytes / bandwidth
    print(f"\nstep (Python loop, median): {step_ms:.2f} ms; session run: {run_us / 1000:.2f} ms; kernels: "
          f"{kernel_us / 1000:.2f} ms; weights read per step: {weight_bytes / 1e6:.1f} MB; copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s -> bound {bound_ms:.2f} ms")
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps({
        "folder": str(args.folder), "threads": args.threads, "spinning": args.spin, "steps": n,
        "load_avg": os.getloadavg()[0], "step_ms": step_ms, "session_run_ms": run_us / 1000,
        "kernel_ms": kernel_us / 1000, "weight_mb": weight_bytes / 1e6, "copy_gb_s": bandwidth / 1e9,
        "bound_ms": bound_ms, "per_op_us": dict(rows), "nodes": len(graph.node), "date": time.strftime("%Y-%m-%d"),
    }, indent=2) + "\n")
    trace.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
