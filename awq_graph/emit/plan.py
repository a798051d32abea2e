"""Which graphs compile tries to write, in order, decided once before calibration."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from awq_graph.core.analysis import decoder_layers, head_reads_token_table, output_head, token_lookup, token_table
from awq_graph.core.errors import ExportError
from awq_graph.core.group_fit import GroupFit
from awq_graph.core.ir import GraphModel, module_path
from awq_graph.emit.builder import GraphFacts
from awq_graph.emit.decoder import build_decoder, fused_support
from awq_graph.emit.families import family_of
from awq_graph.emit.gpt2 import build_gpt2_decoder, gpt2_support
from awq_graph.emit.logits_only import custom_translations
from awq_graph.passes.channel_flow import norm_offsets

# a family row's ``block`` -> (why the decoder does not fit, or None; the builder of the decoder)
BLOCK_WRITERS = {"llama": (fused_support, build_decoder), "gpt2": (gpt2_support, build_gpt2_decoder)}

# the writers, by the graph each writes
FUSED, GENERIC, LOGITS_ONLY = "kv-decoder", "generic-kv-decoder", "logits-only"


@dataclass(frozen=True)
class GraphPlan:
    """The graphs to try, in order (``writers``: ``FUSED``, ``GENERIC``, ``LOGITS_ONLY``); the
    first that passes its check is written. ``reason``: why the fused KV-cache decoder is not
    among them (None when it is first); ``asked``: the graph the caller chose, whose skipping of
    the others is no warning (None: the best that fits); ``facts``: what the fused writers read
    off the graph."""

    writers: tuple[str, ...]
    reason: str | None = None
    asked: str | None = None
    facts: GraphFacts | None = None

    @property
    def kv_decoder(self) -> bool:
        return self.writers[0] == FUSED


def plan_graph(gm: GraphModel, model, kv_cache: bool | str = True, group_size: int | None = None) -> GraphPlan:
    """The graphs to try. ``kv_cache``: True (the fused decoder where it fits), "generic" (the
    generic decoder), False (logits only). Fails (before any search) when no writer can write
    this graph: the fused decoder does not fit and the exported graph holds a custom op
    torch.onnx cannot translate."""
    if not kv_cache:
        plan = GraphPlan((LOGITS_ONLY,), "`kv_cache=False`", asked=LOGITS_ONLY)
    elif kv_cache == "generic":
        plan = GraphPlan((GENERIC, LOGITS_ONLY) if model is not None else (LOGITS_ONLY,), "`kv_cache='generic'`",
                         asked=GENERIC)
    else:
        reason = "no HF model object" if model is None else decoder_support(model, GroupFit.of(gm, group_size) if group_size else None)
        facts = graph_facts(gm) if reason is None else None
        if reason is None and facts is None:
            reason = "no linear writes the logits"
        plan = (GraphPlan((FUSED, LOGITS_ONLY), facts=facts) if reason is None else
                GraphPlan((GENERIC, LOGITS_ONLY) if model is not None else (LOGITS_ONLY,), reason))
    if not plan.kv_decoder:
        refuse_untranslatable(gm, f"no KV-cache decoder: {plan.reason}", "; nothing was quantized")
    return plan


def graph_facts(gm: GraphModel) -> GraphFacts | None:
    """What the decoder writers read off the graph (None: no linear writes the logits)."""
    head = output_head(gm)
    if head is None:
        return None
    layers, _ = decoder_layers(gm)
    lookup = module_path(token_lookup(gm))
    return GraphFacts(layers, head, lookup, token_table(gm), head_reads_token_table(gm), norm_offsets(gm))


def decoder_support(model, fit: GroupFit | None = None) -> str | None:
    """None when one of the KV-cache decoders fits ``model`` (quantized in the groups of ``fit``);
    otherwise why none does."""
    family, reason = family_of(model)
    if family is None:
        return reason
    supports, _ = BLOCK_WRITERS[family.block]
    return supports(model, family, fit)


def refuse_untranslatable(gm: GraphModel, why_not_fused: str, tail: str = "") -> None:
    """Raise when the graph holds an op torch.onnx cannot translate (no graph but the fused one
    could be written)."""
    blockers = untranslatable_ops(gm)
    if blockers:
        op, module = next(iter(blockers.items()))
        raise ExportError(f"cannot write this model to ONNX: no ONNX translation for the op {op} "
                          f"(used in '{module}'), and {why_not_fused}{tail}")


def untranslatable_ops(gm: GraphModel) -> dict[str, str]:
    """Custom (non-aten) ops in the graph that torch.onnx has no translation for -> the first
    module that uses each."""
    from torch.onnx._internal.exporter import _registration

    registry = _registration.ONNXRegistry.from_torchlib()
    ours = custom_translations()
    where: dict[str, str] = {}
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target.namespace in ("aten", "prims") or registry.is_registered(target) or target in ours:
            continue
        where.setdefault(f"{target.namespace}.{target._opname}", module_path(node) or "top level")
    return where
