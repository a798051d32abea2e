"""The write loop: each writer of the plan in turn writes its graph and checks it; the first that
passes is kept, and what failed is removed, with why."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from awq_graph.core.cache_names import CONTEXT_KEY
from awq_graph.core.errors import ExportError, InputError, first_line
from awq_graph.core.ir import GraphModel
from awq_graph.core.numerics import QuantizedWeight
from awq_graph.emit.builder import LazyMatrix, LinearWeights, head_reads_table, save_decoder
from awq_graph.emit.checks import (FLOAT16_TOLERANCE, FLOAT_TOLERANCE, INT8_TOLERANCE, check_decoder,
                                   check_logits_only, check_written_integers, checked_layers, generic_check_tokens,
                                   over_written_tensors, remove_written)
from awq_graph.emit.families import family_of
from awq_graph.emit.generic import GenericUnsupported, export_cached_onnx
from awq_graph.emit.logits_only import export_float_onnx, save_model
from awq_graph.emit.plan import BLOCK_WRITERS, FUSED, GENERIC, LOGITS_ONLY, GraphPlan, plan_graph, refuse_untranslatable
from awq_graph.passes.matmulnbits import SPILLED, RewriteMatMulNBits, SetAccuracyLevel
from awq_graph.head_table import TokenTable


@dataclass
class Emitted:
    kind: str  # FUSED, GENERIC or LOGITS_ONLY
    quantized_linears: int
    warnings: list[str] = field(default_factory=list)
    check_deviation: float | None = None  # at the written accuracy level
    float_check_deviation: float | None = None  # the same graph with float activations
    checked_layers: list[int] | None = None  # the decoder layers of the checked graph
    integers_checked: int = 0  # linears whose integers in the file were compared with the search's digests


class NotWritten(Exception):
    """A writer's graph failed to build or its check: nothing of it is left; the message says why."""


@dataclass(frozen=True)
class WriteJob:
    """What every writer writes from."""

    gm: GraphModel
    quantized: dict[str, QuantizedWeight]
    path: Path
    model: object
    accuracy_level: int
    act_dtype: str
    quantized_table: TokenTable | None
    plan: GraphPlan

    @property
    def weight_param(self) -> dict[str, str]:
        return {n: self.gm.linears[n].weight for n in self.quantized}


def write_onnx(gm: GraphModel, quantized: dict[str, QuantizedWeight], path: Path, *, model=None,
               accuracy_level: int = 0, act_dtype: str = "float32", kv_cache: bool | str = True,
               quantized_table: TokenTable | None = None, plan: GraphPlan | None = None) -> Emitted:
    """Write the model to ``path``: the first graph of ``plan`` (made here when None) that passes
    its check. ``quantized_table``: the integers the token lookup reads (GatherBlockQuantized)."""
    if plan is None:
        plan = plan_graph(gm, model, kv_cache, next((q.scheme.group_size for q in quantized.values()), None))
    job = WriteJob(gm, quantized, Path(path), model, accuracy_level, act_dtype, quantized_table, plan)
    reason, generic_failure = plan.reason, None  # why no fused decoder; why no generic one
    for i, kind in enumerate(plan.writers):
        if kind != FUSED and (i == 0 or plan.writers[i - 1] == FUSED):
            _refuse_in_memory_writers(job, reason)
        try:
            emitted = WRITERS[kind](job)
        except NotWritten as exc:
            remove_written(job.path)
            if kind == FUSED:
                reason = str(exc)
            else:
                generic_failure = str(exc)
            continue
        emitted.warnings = _warnings(plan, kind, reason, generic_failure)
        return emitted
    raise AssertionError("awq-graph bug: the logits-only writer raises rather than skip")


def _refuse_in_memory_writers(job: WriteJob, reason: str) -> None:
    """Before the first writer exported from the model in memory: refuse what none of them can
    take (a streamed model, float16 activations, an op torch.onnx cannot translate)."""
    if job.gm.streamed:
        raise ExportError(f"{reason}; the logits-only graph is exported from the model in memory: compile with "
                          f"`stream=False` for it, and please report this model")
    if job.act_dtype != "float32":
        raise InputError(f"`act_dtype={job.act_dtype}` needs the KV-cache decoder, and {reason}")
    refuse_untranslatable(job.gm, reason)


def _warnings(plan: GraphPlan, kind: str, reason: str | None, generic_failure: str | None) -> list[str]:
    if kind == FUSED or kind == plan.asked:
        return []
    if kind == GENERIC:
        return [f"no fused KV-cache decoder for this model ({reason}): wrote the generic KV-cache decoder "
                "(torch.onnx of the model with its cache)"]
    if plan.kv_decoder:  # the fused decoder failed its check
        return [f"{reason}: wrote the logits-only graph instead; please report this model"]
    if generic_failure is not None:
        return [f"no KV-cache decoder for this model ({reason}; the generic one: {generic_failure}): "
                "the ONNX graph is logits-only"]
    return [f"no KV-cache decoder for this model ({reason}): the ONNX graph is logits-only"]


def write_fused(job: WriteJob) -> Emitted:
    """The fused KV-cache decoder of the model's family (``emit.decoder``, ``emit.gpt2``), then its
    check within one layer's memory: the integers in the file are the search's (every linear, by
    digest), and a shallow decoder (a few layers, the head) over the file's own tensors computes
    what the torch program computes through the same layers. The graph with float activations
    is held to a tight tolerance (the structure), the one at the written accuracy level loosely."""
    gm, facts = job.gm, job.plan.facts
    # a head reading the table's initializer needs no matrix of its own
    tied = head_reads_table(facts.tied_head, facts.head in job.quantized, job.quantized_table)
    linears = linear_weights(gm, job.quantized, skip={facts.head} if tied else ())
    family, _ = family_of(job.model)
    _, build = BLOCK_WRITERS[family.block]

    def decoder(layers=None):
        return build(job.model, family, facts, gm.params, linears, quantized_table=job.quantized_table,
                     accuracy_level=job.accuracy_level, act_dtype=job.act_dtype, layers=layers)

    written = decoder()
    record_context(written, job.model)
    spilled = {v.name: v.meta[SPILLED] for v in written.graph.initializers.values() if SPILLED in v.meta}
    save_decoder(written, job.path)  # the integers and the head are read as they are written
    del written
    # (integers held in memory rather than spilled, such as expert banks, are checked by running only)
    integers_checked = check_written_integers(job.path, spilled) if spilled else 0
    layers = checked_layers(gm, job.model)
    graphs = {job.accuracy_level: job.path.with_name(job.path.stem + ".check.onnx")}
    if job.accuracy_level != 0:
        graphs[0] = job.path.with_name(job.path.stem + ".check-float-activations.onnx")
    try:
        shallow = over_written_tensors(decoder(layers), job.path)
        for level, graph in graphs.items():
            SetAccuracyLevel(level)(shallow)
            ir.save(shallow, graph)  # its tensors stay in path's data file, which it reads too
        del shallow
        deviations = check_decoder(graphs, gm, job.quantized, job.quantized_table, layers)
    except Exception as exc:  # onnxruntime refused the graph: our bug, and the logits-only graph may still do
        raise NotWritten(f"the fused KV-cache decoder failed in onnxruntime ({first_line(exc)})") from exc
    finally:
        for graph in graphs.values():
            graph.unlink(missing_ok=True)
    int8_experts = any(q.scheme.bits == 8 and gm.linears[n].experts for n, q in job.quantized.items())
    tolerance = FLOAT_TOLERANCE if job.act_dtype == "float32" and not int8_experts else FLOAT16_TOLERANCE
    at_level = deviations.get(job.accuracy_level, deviations[0])
    if not (deviations[0] <= tolerance and at_level <= INT8_TOLERANCE):
        raise NotWritten(f"the fused KV-cache decoder differs from the torch program (relative logit error "
                         f"{deviations[0]:.1e} with float activations, tolerance {tolerance:.0e}; "
                         f"{at_level:.1e} at accuracy level {job.accuracy_level}, tolerance {INT8_TOLERANCE:.0e})")
    return Emitted(FUSED, len(job.quantized), [], at_level, deviations[0], layers, integers_checked)


def write_generic(job: WriteJob) -> Emitted:
    """The generic KV-cache decoder (``emit.generic``), checked like the fused one: prefill and
    one-token steps against its cache in onnxruntime, with float activations (tight) and at the
    written accuracy level (loose), against the torch program with the same dequantized weights."""
    try:
        onnx_model = export_cached_onnx(job.model, job.gm)
    except GenericUnsupported as exc:  # its cache is of another kind, or torch.onnx failed
        raise NotWritten(str(exc)) from exc
    rewritten = _rewrite(job, onnx_model, NotWritten, "its graph")
    record_context(onnx_model, job.model)
    save_model(onnx_model, job.path)
    del onnx_model
    graphs = {job.accuracy_level: job.path}
    if job.accuracy_level != 0:
        graphs[0] = job.path.with_name(job.path.stem + ".check-float-activations.onnx")
        written = ir.load(job.path)
        SetAccuracyLevel(0)(written)
        ir.save(written, graphs[0])  # its tensors stay in path's data file
    try:
        deviations = check_decoder(graphs, job.gm, job.quantized, None, tokens=generic_check_tokens(job.model))
    except Exception as exc:
        raise NotWritten(f"it failed in onnxruntime ({first_line(exc)})") from exc
    finally:
        if job.accuracy_level != 0:
            graphs[0].unlink(missing_ok=True)
    at_level = deviations.get(job.accuracy_level, deviations[0])
    if not (deviations[0] <= FLOAT_TOLERANCE and at_level <= INT8_TOLERANCE):
        raise NotWritten(f"it differs from the torch program (relative logit error {deviations[0]:.1e}, "
                         f"{at_level:.1e} at accuracy level {job.accuracy_level})")
    return Emitted(GENERIC, rewritten, [], at_level, deviations[0])


def write_logits_only(job: WriteJob) -> Emitted:
    """torch.onnx of the folded program (logits only, no cache), each quantized linear rewritten to
    MatMulNBits, checked like the decoders. The last writer: a failure raises."""
    onnx_model = export_float_onnx(job.gm)
    rewritten = _rewrite(job, onnx_model, ExportError, "the logits-only graph")
    record_context(onnx_model, job.model)
    save_model(onnx_model, job.path)
    del onnx_model
    deviation = check_logits_only(job.path, job.gm, job.quantized, job.accuracy_level)
    tolerance = FLOAT_TOLERANCE if job.accuracy_level == 0 else INT8_TOLERANCE
    if not deviation <= tolerance:
        remove_written(job.path)
        raise ExportError(f"the logits-only graph differs from the torch program (relative logit error {deviation:.1e}, "
                          f"tolerance {tolerance:.0e}): nothing was written; please report this model")
    return Emitted(LOGITS_ONLY, rewritten, [], deviation, deviation if job.accuracy_level == 0 else None)


WRITERS = {FUSED: write_fused, GENERIC: write_generic, LOGITS_ONLY: write_logits_only}


def _rewrite(job: WriteJob, onnx_model: ir.Model, error: type[Exception], where: str) -> int:
    """The quantized linears of a torch.onnx graph rewritten to MatMulNBits; how many."""
    rewrite = RewriteMatMulNBits(job.quantized, job.weight_param, job.accuracy_level)(onnx_model)
    if rewrite.unmatched:
        layer, why = next(iter(rewrite.unmatched.items()))
        raise error(f"cannot write '{layer}' as MatMulNBits in {where}: {why}")
    return len(rewrite.rewritten)


def record_context(onnx_model: ir.Model, model) -> None:
    """The checkpoint's context length in the model's metadata, for the runtime's limits."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions:
        onnx_model.metadata_props[CONTEXT_KEY] = str(int(positions))


def linear_weights(gm: GraphModel, quantized: dict[str, QuantizedWeight], skip=()) -> dict[str, LinearWeights]:
    """Every linear of the graph by module name: its integers when quantized, else its float
    matrix (``skip``: a float one whose matrix is not read, e.g. a head tied to the table)."""
    out = {}
    for name, site in gm.linears.items():
        bias = gm.params[site.bias].detach() if site.bias else None
        if name in skip and name not in quantized:
            out[name] = LinearWeights(None, None, bias)
        elif name in quantized:
            out[name] = LinearWeights(quantized[name], None, bias)
        else:
            shape = (site.out_features * max(site.experts, 1), site.in_features)
            out[name] = LinearWeights(None, LazyMatrix(shape, lambda site=site: site.matrix(gm.params).detach()), bias)
    return out
