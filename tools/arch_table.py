"""Markdown table of the scaling groups derived per architecture, and the ONNX graph compile
writes for it (tiny random models, offline).

    python tools/arch_table.py [llama mistral ...]   > prints the README's architecture table
"""
from __future__ import annotations

import sys
import warnings

from awq_graph.emit import decoder_support, untranslatable_ops
from awq_graph.export import export_model
from awq_graph.load import tiny_random_model
from awq_graph.match import match

DEFAULT = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "mixtral",
           "qwen2_moe", "qwen3_moe", "olmoe", "granite", "starcoder2"]


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore")
    print("| architecture | groups per layer (prev_op -> layers) | beyond AutoAWQ's mapping | exact (--verify) "
          "| not found, and why | ONNX graph |")
    print("|---|---|---|---|---|---|")
    for arch in argv or DEFAULT:
        model = tiny_random_model(arch)
        gm = export_model(model)
        found = match(gm, verify=True)
        prefix, per_layer, skipped = found.prefix, found.per_layer, found.skipped
        base = f"{prefix}.0."
        def pair(g):
            return f"{g.prev_op.removeprefix(base)} -> {', '.join(x.removeprefix(base) for x in g.layers)}"

        groups = "; ".join(pair(g) for g in per_layer[0])
        # AutoAWQ adds v -> o only when v_proj and o_proj have the same shape: never under GQA
        beyond = "; ".join(pair(g) + " (grouped-query repeat)" for g in per_layer[0]
                           if any("repeat" in k for k in g.kinds()))
        missing = "; ".join(sorted({f"{s.prev_op.removeprefix(base) or '?'} -> "
                                    f"{', '.join(x.removeprefix(base) for x in s.layers)}: {s.reason.replace(base, '')}"
                                    for s in skipped if all(x.startswith(base) for x in s.layers)}))
        deviation = found.verification.deviation
        print(f"| {arch} | {groups} | {beyond or '-'} | {deviation:.0e} | {missing or '-'} | {_graph(model, gm)} |")
    return 0


def _graph(model, gm) -> str:
    experts = any(s.experts for s in gm.linears.values())
    if decoder_support(model) is None:
        return "KV-cache decoder" + (", experts in QMoE" if experts else "")
    blockers = untranslatable_ops(gm)
    if blockers:
        return f"none: no ONNX translation for {next(iter(blockers))}"
    return "logits-only (torch.onnx)" + (", a MatMulNBits per expert" if experts else "")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
