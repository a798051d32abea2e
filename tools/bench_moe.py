"""MoE benchmark (not a test): a Mixtral-shaped model with random weights, compiled with AWQ
(experts in QMoE), against torch eager float32: compile time, prefill and decode speed, size.

There is no small real MoE checkpoint offline, so the weights are random (seeded) and the
figures are about speed and size only, not quality. onnxruntime-genai's model builder has no
Mixtral, Qwen2-MoE or Qwen3-MoE (it builds PhiMoE, GPT-OSS and a few others), and torch.onnx
has no translation of its own for transformers' grouped_mm_fallback (our logits-only fallback
has no KV cache), so torch eager is the baseline.

    python tools/bench_moe.py            # builds bench/moe/ (ignored), figures -> tools/results/moe.json

Timing is tools/bench_inference.py's: each runtime in its own process, the same thread count,
a 512-token prompt then 128 greedy tokens, median step, best of --repeats; torch under
OMP_WAIT_POLICY=PASSIVE, onnxruntime with allow_spinning=0 (and with spinning, for reference).
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

from bench_inference import model_bytes  # tools/, this script's folder, is on sys.path

SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
             num_key_value_heads=4, head_dim=64, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2,
             max_position_embeddings=4096, sliding_window=None, tie_word_embeddings=False)


def build(work: Path, samples: int, seqlen: int) -> tuple[Path, Path, dict]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import awq_graph

    hf, out = work / "hf-float32", work / "ours-awq-int4"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", **SHAPE)).eval()
    if not (hf / "model.safetensors").exists():
        model.save_pretrained(hf)
    compile_s = None
    if not (out / "report.json").exists():
        calib = torch.randint(0, SHAPE["vocab_size"], (samples, seqlen), generator=torch.Generator().manual_seed(1))
        t = time.perf_counter()
        awq_graph.compile(model, calib, out, n_samples=samples, seqlen=seqlen, quantize_lm_head=True, overwrite=True)
        compile_s = time.perf_counter() - t
    report = json.loads((out / "report.json").read_text())
    report["compile_s"] = compile_s if compile_s is not None else report.get("compile_s")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    params = sum(p.numel() for p in model.parameters())
    active = params - sum(p.numel() for n, p in model.named_parameters() if ".experts." in n) * (
        1 - SHAPE["num_experts_per_tok"] / SHAPE["num_local_experts"])
    return hf, out, {"params": params, "active_params": int(active), "report": report}


def _time(kind: str, path: Path, args) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, str(REPO / "tools" / "bench_inference.py"), "--one", kind, "--path", str(path),
           "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--samples", type=int, default=32, help="calibration sequences (random ids)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--work", type=Path, default=REPO / "bench" / "moe")
    p.add_argument("--out", type=Path, default=REPO / "tools" / "results" / "moe.json")
    args = p.parse_args()
    hf, ours, facts = build(args.work, args.samples, args.seqlen)
    rows = {"torch eager float32": (_time("torch", hf, args), model_bytes(hf)),
            "ours AWQ int4 (QMoE), level 4": (_time("ours", ours, args), model_bytes(ours)),
            "ours, spinning on": (_time("ours-spin", ours, args), model_bytes(ours))}
    base = rows["torch eager float32"][0]["decode_ms"]
    print(f"Mixtral-shaped, random weights: {facts['params'] / 1e6:.0f}M parameters, "
          f"{facts['active_params'] / 1e6:.0f}M active per token; {args.threads} threads, "
          f"{args.prompt_tokens}-token prompt + {args.new_tokens} tokens")
    print(f"{'runtime':34} {'prefill tok/s':>13} {'decode ms/tok':>13} {'vs torch':>9} {'size MB':>8} {'load':>5}")
    for name, (row, size) in rows.items():
        print(f"{name:34} {args.prompt_tokens / row['prefill_s']:13.0f} {row['decode_ms']:13.2f} "
              f"{base / row['decode_ms']:8.2f}x {size / 1e6:8.1f} {row['load_avg']:5.2f}")
    report = facts["report"]
    print(f"compile (AWQ, {args.samples} x {args.seqlen} random-id calibration): {report['compile_s'] or 0:.0f} s "
          f"(search {report['search_s']:.0f} s), peak RSS {report['peak_rss_mb'] / 1e3:.1f} GB; decoder check "
          f"{report['graph']['float_check_deviation']:.1e} (float activations), "
          f"{report['graph']['check_deviation']:.1e} (int8, level 4)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": {"shape": SHAPE, "params": facts["params"], "active_params": facts["active_params"]},
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out")},
        "compile": {"seconds": report["compile_s"], "search_s": report["search_s"], "timings_s": report["timings_s"],
                    "peak_rss_mb": report["peak_rss_mb"], "check_deviation": report["graph"]["check_deviation"],
                    "float_check_deviation": report["graph"]["float_check_deviation"]},
        "runtimes": {name: {**row, "size_bytes": size} for name, (row, size) in rows.items()},
    }, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
