"""The scaling groups derived per architecture, and the ONNX graph compile writes for it (tiny
random models, offline).

    python tools/arch_table.py [llama mistral ...]          > the README's table of the fused families
    python tools/arch_table.py --all [--jobs 2] [--compile]  > every causal-LM model type transformers lists

``--all`` is the survey: each model type of the installed transformers' causal-LM mapping is built
shrunk (``awq_graph.load.tiny_random_model``), exported, matched and verified (random scales folded
along every group: the largest relative logit deviation) in a process of its own with a time limit,
so that one architecture that hangs or crashes is a row, not the end of the survey. ``--compile``
also compiles each architecture that has groups (AWQ, 4 x 16 random token ids) and records the
graph written and its check. The rows go to tools/results/arch_survey.json, the Markdown table to
docs/architectures.md (and stdout), with a one-line reason for every architecture that could not be
built, exported or matched.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from awq_graph.core.errors import first_line  # noqa: E402
DEFAULT = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "mixtral",
           "qwen2_moe", "qwen3_moe", "olmoe", "granite", "starcoder2"]
VERIFY_TOLERANCE = 1e-4  # awq_graph.match's
OUT_OF_MEMORY = ("killed (out of memory): built at sizes the tiny shape did not reach (it sets top-level config "
                 "fields only: a nested text or vision config keeps its defaults)")
TIME_LIMIT_S = 480  # per architecture (build, export, match, verify, and the compile when asked)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("types", nargs="*", help="model types (default: the fused families)")
    p.add_argument("--all", action="store_true", help="every causal-LM model type of the installed transformers")
    p.add_argument("--compile", action="store_true", help="also a tiny AWQ compile of each type with groups")
    p.add_argument("--jobs", type=int, default=1, help="architectures surveyed at once (--all)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # the worker: one type, its row as JSON
    p.add_argument("--results", type=Path, default=REPO / "tools" / "results" / "arch_survey.json")
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "architectures.md")
    p.add_argument("--render", action="store_true", help="write --doc from the rows already in --results")
    p.add_argument("--merge", action="store_true", help="keep the rows of other types already in --results")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.one:
        print(json.dumps(survey_one(args.one, args.compile)))
        return 0
    if args.render:
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        args.doc.write_text(survey_table(json.loads(args.results.read_text())["rows"]))
        return 0
    if args.all:
        return _survey(args)
    return _family_table(args.types or DEFAULT)


def survey_one(model_type: str, compile_it: bool = False) -> dict:
    """One architecture's row: what was built, exported and matched, or where and why it stopped."""
    import logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from awq_graph.export import export_model
    from awq_graph.load import tiny_random_model
    from awq_graph.match import match

    row: dict = {"type": model_type}
    t0 = time.perf_counter()
    stage = "build"
    try:
        model = tiny_random_model(model_type)
        row["class"] = type(model).__name__
        stage = "export"
        gm = export_model(model, seqlen=16)  # the tiny compile's calibration length
        stage = "match"
        found = match(gm, verify=True)
        stage = "graph"
        graph = _graph(model, gm)
    except Exception as exc:
        row.update(status=f"{stage} failed", reason=first_line(exc, 300), seconds=round(time.perf_counter() - t0, 1))
        return row
    base = f"{found.prefix}.0."
    layer0 = found.per_layer[0] if found.per_layer else []
    row.update(decoder_layers=found.prefix, groups_per_layer=len(layer0), layer0=[_pair(g, base) for g in layer0],
               not_found=_not_found(found, base),
               deviation=found.verification.deviation if found.verification else None, graph=graph,
               fixed_seq=gm.fixed_seq, golden=_golden(model_type, found),
               status="groups" if layer0 else "no groups")
    if compile_it and layer0:
        row["compile"] = _tiny_compile(model)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _tiny_compile(model) -> dict:
    import torch

    import awq_graph

    with tempfile.TemporaryDirectory() as tmp:
        try:
            vocab = int(model.get_input_embeddings().num_embeddings)  # a composite config may have no vocab_size
            ids = torch.randint(3, vocab, (4, 16), generator=torch.Generator().manual_seed(0))
            result = awq_graph.compile(model, ids, Path(tmp) / "out", n_samples=4, seqlen=16, scheme="uint4_wo_16",
                                       warn=lambda message: None)
        except Exception as exc:
            return {"ok": False, "reason": first_line(exc, 300)}
        graph = result.report["graph"]
        return {"ok": True, "kind": graph["kind"], "check_deviation": graph["check_deviation"],
                "warnings": result.report["warnings"]}


def _golden(model_type: str, found) -> str:
    """The groups against the reviewed golden (tests/golden/groups): "same", "differs" or "none"."""
    path = REPO / "tests" / "golden" / "groups" / f"{model_type}.json"
    if not path.exists():
        return "none"
    return "same" if json.loads(path.read_text()) == {"model_type": model_type, **found.to_json()} else "differs"


def _pair(g, base: str) -> str:
    return f"{g.prev_op.removeprefix(base)} -> {', '.join(x.removeprefix(base) for x in g.layers)}"


def _not_found(found, base: str) -> list[str]:
    """Layer 0's groups that were not found, each with the graph's reason."""
    return sorted({f"{s.prev_op.removeprefix(base) or '?'} -> {', '.join(x.removeprefix(base) for x in s.layers)}: "
                   f"{s.reason.replace(base, '')}" for s in found.skipped if all(x.startswith(base) for x in s.layers)})


def _survey(args) -> int:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    print(f"surveying {len(types)} model types, {args.jobs} at a time", file=sys.stderr, flush=True)

    def run(model_type: str) -> dict:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", model_type] + (["--compile"] if args.compile else [])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIME_LIMIT_S,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
        except subprocess.TimeoutExpired:
            return {"type": model_type, "status": "timeout", "reason": f"over {TIME_LIMIT_S} s"}
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            if proc.returncode == -9:
                last = OUT_OF_MEMORY
            return {"type": model_type, "status": "crashed", "reason": last[:300],
                    "seconds": round(time.perf_counter() - t0, 1)}
        return json.loads(lines[-1])

    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(run, types):
            rows.append(row)
            print(f"{row['type']}: {row['status']} {row.get('reason', '')}"[:200], file=sys.stderr, flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and args.results.exists():
        new = {r["type"]: r for r in rows}
        rows = [new.pop(r["type"], r) for r in json.loads(args.results.read_text())["rows"]] + list(new.values())
    args.results.write_text(json.dumps({"transformers": _version(), "rows": rows}, indent=2) + "\n")
    table = survey_table(rows)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(table)
    print(table)
    return 0


def _version() -> str:
    import transformers

    return transformers.__version__


def survey_table(rows: list[dict]) -> str:
    """The survey as Markdown: a summary line, then one row per model type."""
    exact = [r for r in rows if r.get("status") == "groups" and r.get("deviation") is not None
             and r["deviation"] <= VERIFY_TOLERANCE]
    compiled = [r for r in rows if r.get("compile", {}).get("ok")]
    kinds = {kind: sum(r["compile"]["kind"] == kind for r in compiled)
             for kind in ("kv-decoder", "generic-kv-decoder", "logits-only")}
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [f"# Architectures: the survey of every causal-LM model type (transformers {_version()})", "",
             "Written by `python tools/arch_table.py --all --compile --jobs 2` (tiny random models, offline); "
             "the rows are in tools/results/arch_survey.json.", "",
             f"{len(rows)} model types: groups derived and exact under --verify for **{len(exact)}**; "
             + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
             + (f"; a tiny AWQ compile wrote a model for {len(compiled)}: {kinds['kv-decoder']} fused KV-cache "
                f"decoders and {kinds['generic-kv-decoder']} generic ones, each checked against torch, and "
                f"{kinds['logits-only']} logits-only graphs, each checked against torch." if compiled else ".")
             + _golden_summary(rows), "",
             "| model type | groups per layer | exact (--verify) | not found, and why | ONNX graph | tiny AWQ compile "
             "| stopped at, and why |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        groups = "; ".join(r.get("layer0", [])) or "-"
        deviation = f"{r['deviation']:.0e}" if r.get("deviation") is not None else "-"
        comp = r.get("compile")
        comp_cell = "-" if not comp else (f"failed: {comp['reason']}" if not comp["ok"] else
                                          f"{comp['kind']}, check {comp['check_deviation']:.0e}"
                                          if comp["check_deviation"] is not None else f"{comp['kind']}, not checked")
        if r.get("golden") == "differs":
            comp_cell += "; groups differ from the golden"
        reason = OUT_OF_MEMORY if r.get("reason") == "exit -9" else r.get("reason", "")
        stopped = f"{r['status']}: {reason}" if r["status"] not in ("groups", "no groups") else "-"
        graph = r.get("graph", "-") + (f"; torch.export fixed the length at {r['fixed_seq']}" if r.get("fixed_seq") else "")
        cells = [r["type"], groups, deviation, "; ".join(r.get("not_found", [])) or "-", graph, comp_cell, stopped]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _golden_summary(rows: list[dict]) -> str:
    said = [r["golden"] for r in rows if r.get("golden")]
    if not said:
        return ""
    return (f" Groups against the reviewed goldens (tests/golden/groups): {said.count('same')} the same, "
            f"{said.count('differs')} differ, {said.count('none')} without one.")


def _family_table(types: list[str]) -> int:
    from awq_graph.export import export_model
    from awq_graph.load import tiny_random_model
    from awq_graph.match import match

    print("| architecture | groups per layer (prev_op -> layers) | beyond AutoAWQ's mapping | exact (--verify) "
          "| not found, and why | ONNX graph |")
    print("|---|---|---|---|---|---|")
    for arch in types:
        model = tiny_random_model(arch)
        gm = export_model(model)
        found = match(gm, verify=True)
        prefix, per_layer = found.prefix, found.per_layer
        base = f"{prefix}.0."
        groups = "; ".join(_pair(g, base) for g in per_layer[0])
        # AutoAWQ adds v -> o only when v_proj and o_proj have the same shape: never under GQA
        beyond = "; ".join(_pair(g, base) + " (grouped-query repeat)" for g in per_layer[0]
                           if any("repeat" in k for k in g.kinds()))
        missing = "; ".join(_not_found(found, base))
        deviation = found.verification.deviation
        print(f"| {arch} | {groups} | {beyond or '-'} | {deviation:.0e} | {missing or '-'} | {_graph(model, gm)} |")
    return 0


def _graph(model, gm) -> str:
    from awq_graph.emit import decoder_support, untranslatable_ops

    experts = any(s.experts for s in gm.linears.values())
    if decoder_support(model) is None:
        return "KV-cache decoder" + (", experts in QMoE" if experts else "")
    from awq_graph.emit.generic import GenericUnsupported, cache_layout, one_token_per_step

    blockers = untranslatable_ops(gm)
    if blockers:
        return f"none: no ONNX translation for {next(iter(blockers))}"
    per_expert = ", a MatMulNBits per expert" if experts else ""
    try:
        layout = cache_layout(model)
    except GenericUnsupported as exc:
        return f"logits-only (torch.onnx){per_expert}: {exc}"
    kinds = {"key": "keys and values", "value": "keys and values", "indexer_key": "indexer keys"}
    held = " + ".join(dict.fromkeys(kinds.get(e.kind, "linear-attention states") for e in layout.entries))
    one_token = ", one token per step" if one_token_per_step(layout, gm) else ""
    return f"generic KV-cache decoder (torch.onnx with the cache: {held}{one_token})" + per_expert


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
