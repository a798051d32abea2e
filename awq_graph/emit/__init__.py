"""Which ONNX graph to write, and the check that it computes what the torch program computes.

Two writers, both over onnx_ir and one MatMulNBits node builder (``awq_graph.passes.matmulnbits``):
  * ``awq_graph.emit.decoder`` / ``awq_graph.emit.gpt2``: a KV-cache decoder of onnxruntime's
    fused ops, for the model families of ``awq_graph.emit.families`` (``decoder_support``), from
    the family's row and the graph's facts (``graph_facts``). Checked after writing: prefill and
    one-token decode steps in onnxruntime against the torch program with the same dequantized
    weights.
  * ``awq_graph.emit.generic``: for the other architectures whose cache transformers keeps in its
    standard layers (keys and values, indexer keys, linear-attention states), torch.onnx of the
    model itself with the cache as inputs and outputs, its quantized linears rewritten to
    MatMulNBits, checked like the fused decoder.
  * ``awq_graph.emit.logits_only``: torch.onnx of the folded program (logits only, no KV cache),
    then each quantized linear rewritten to MatMulNBits (``RewriteMatMulNBits``). Any
    architecture torch.onnx can translate.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from awq_graph.core.analysis import decoder_layers, head_reads_token_table, output_head, token_lookup, token_table
from awq_graph.core.errors import ExportError, InputError, first_line
from awq_graph.core.ir import GraphModel, module_path
from awq_graph.core.numerics import QuantizedWeight
from awq_graph.core.spill import SpilledWeight, digest
from awq_graph.core.stages import Stages, run_layers
from awq_graph.emit.builder import GraphFacts, LazyMatrix, LinearWeights, head_reads_table, save_decoder
from awq_graph.emit.decoder import build_decoder, fused_support
from awq_graph.emit.families import family_of
from awq_graph.emit.generic import GenericUnsupported, export_cached_onnx
from awq_graph.emit.gpt2 import build_gpt2_decoder, gpt2_support
from awq_graph.emit.logits_only import custom_translations, export_float_onnx, save_model
from awq_graph.passes.channel_flow import norm_offsets
from awq_graph.passes.matmulnbits import SPILLED, RewriteMatMulNBits, SetAccuracyLevel
from awq_graph.quantize import TokenTable
from awq_graph.runtime import CONTEXT_KEY


@dataclass
class Emitted:
    kind: str  # "kv-decoder" or "logits-only"
    quantized_linears: int
    warnings: list[str]
    check_deviation: float | None = None  # at the written accuracy level
    float_check_deviation: float | None = None  # the same graph with float activations
    checked_layers: list[int] | None = None  # the decoder layers of the checked graph
    integers_checked: int = 0  # linears whose integers in the file were compared with the search's digests


# a family row's ``block`` -> (why the decoder does not fit, or None; the builder of the decoder)
BLOCK_WRITERS = {"llama": (fused_support, build_decoder), "gpt2": (gpt2_support, build_gpt2_decoder)}

INT8_TOLERANCE = 0.25  # relative logit error allowed with int8 activations (accuracy level 4)
FLOAT_TOLERANCE = 1e-3  # with float32 activations: measured 2e-7 .. 7e-7 on the tiny models and SmolLM2


@dataclass(frozen=True)
class GraphPlan:
    """Which graph compile writes, decided once before calibration: the fused KV-cache decoder
    (``reason`` None; from the graph's ``facts``), or the logits-only graph and why."""

    reason: str | None
    facts: GraphFacts | None = None

    @property
    def kv_decoder(self) -> bool:
        return self.reason is None


def plan_graph(gm: GraphModel, model, kv_cache: bool = True, group_size: int | None = None) -> GraphPlan:
    """The graph to write. Fails (before any search) when neither emitter can write this graph:
    the fused decoder does not fit and the exported graph holds a custom op torch.onnx cannot
    translate."""
    reason = _why_no_decoder(model, kv_cache, group_size)
    facts = None
    if reason is None:
        facts = graph_facts(gm)
        if facts is None:
            reason = "no linear writes the logits"
    if reason is not None:
        _refuse_untranslatable(gm, f"no KV-cache decoder: {reason}", "; nothing was quantized")
    return GraphPlan(reason, facts)


def graph_facts(gm: GraphModel) -> GraphFacts | None:
    """What the decoder writers read off the graph (None: no linear writes the logits)."""
    head = output_head(gm)
    if head is None:
        return None
    layers, _ = decoder_layers(gm)
    lookup = module_path(token_lookup(gm))
    return GraphFacts(layers, head, lookup, token_table(gm), head_reads_token_table(gm), norm_offsets(gm))


def write_onnx(gm: GraphModel, quantized: dict[str, QuantizedWeight], path: Path, *, model=None,
               accuracy_level: int = 0, act_dtype: str = "float32", kv_cache: bool = True,
               quantized_table: TokenTable | None = None, plan: GraphPlan | None = None) -> Emitted:
    """Write the model to ``path``: the fused KV-cache decoder when ``plan`` says so and it passes
    its check, else logits-only. ``quantized_table``: the integers the token lookup reads (GatherBlockQuantized)."""
    if plan is None:
        plan = plan_graph(gm, model, kv_cache, next((q.scheme.group_size for q in quantized.values()), None))
    reason = plan.reason
    if plan.kv_decoder:
        # a head reading the table's initializer needs no matrix of its own
        tied = head_reads_table(plan.facts.tied_head, plan.facts.head in quantized, quantized_table)
        linears = linear_weights(gm, quantized, skip={plan.facts.head} if tied else ())
        family, _ = family_of(model)
        _, build = BLOCK_WRITERS[family.block]
        def build_decoder(layers=None):
            return build(model, family, plan.facts, gm.params, linears, quantized_table=quantized_table,
                         accuracy_level=accuracy_level, act_dtype=act_dtype, layers=layers)

        decoder = build_decoder()
        _record_context(decoder, model)
        spilled = {v.name: v.meta[SPILLED] for v in decoder.graph.initializers.values() if SPILLED in v.meta}
        save_decoder(decoder, path)  # the integers and the head are read as they are written
        del decoder
        # The check, within one layer's memory: the integers in the file are the search's (every
        # linear, by digest), and a shallow decoder (a few layers, the head) over the file's own
        # tensors computes what the torch program computes through the same layers. The graph with
        # float activations is held to a tight tolerance (the structure), the one with int8
        # activations (accuracy level 4) loosely: their rounding is amplified with depth and by MoE
        # routing flipping to other experts (5e-2 on a 6-layer random Mixtral), while a wrong graph
        # is off by O(1).
        # (integers held in memory rather than spilled, such as expert banks, are checked by running only)
        integers_checked = check_written_integers(path, spilled) if spilled else 0
        layers = checked_layers(gm, model)
        graphs = {accuracy_level: path.with_name(path.stem + ".check.onnx")}
        if accuracy_level != 0:
            graphs[0] = path.with_name(path.stem + ".check-float-activations.onnx")
        try:
            shallow = over_written_tensors(build_decoder(layers), path)
            for level, graph in graphs.items():
                SetAccuracyLevel(level)(shallow)
                ir.save(shallow, graph)  # its tensors stay in path's data file, which it reads too
            del shallow
            deviations = check_decoder(graphs, gm, quantized, quantized_table, layers)
        except Exception as exc:  # onnxruntime refused the graph: our bug, and the logits-only graph may still do
            deviations, failure = {0: float("inf")}, first_line(exc)
        else:
            failure = None
        finally:
            for graph in graphs.values():
                graph.unlink(missing_ok=True)
        # float16 rounds visibly, and 8-bit QMoE experts take int8 activations at every level
        int8_experts = any(q.scheme.bits == 8 and gm.linears[n].experts for n, q in quantized.items())
        tolerance = FLOAT_TOLERANCE if act_dtype == "float32" and not int8_experts else 5e-2
        at_level = deviations.get(accuracy_level, deviations[0])
        if deviations[0] <= tolerance and at_level <= INT8_TOLERANCE:
            return Emitted("kv-decoder", len(quantized), [], at_level, deviations[0], layers, integers_checked)
        remove_written(path)
        reason = (f"the fused KV-cache decoder failed in onnxruntime ({failure})" if failure else
                  f"the fused KV-cache decoder differs from the torch program (relative logit error "
                  f"{deviations[0]:.1e} with float activations, tolerance {tolerance:.0e}; "
                  f"{at_level:.1e} at accuracy level {accuracy_level}, tolerance {INT8_TOLERANCE:.0e})")
        warning = f"{reason}: wrote the logits-only graph instead; please report this model"
        if gm.streamed:
            raise ExportError(f"{reason}; the logits-only graph is exported from the model in memory: compile with "
                              f"--no-stream for it, and please report this model")
    else:
        warning = f"no KV-cache decoder for this model ({reason}): the ONNX graph is logits-only"
    if act_dtype != "float32":
        raise InputError(f"--act-dtype {act_dtype} needs the KV-cache decoder, and {reason}")
    _refuse_untranslatable(gm, reason)
    weight_param = {n: gm.linears[n].weight for n in quantized}
    if not plan.kv_decoder and model is not None and reason != "--no-kv-cache":
        try:
            return _write_generic(gm, quantized, weight_param, Path(path), model, accuracy_level, reason)
        except GenericUnsupported as exc:
            warning = (f"no KV-cache decoder for this model ({reason}; the generic one: {exc}): "
                       "the ONNX graph is logits-only")
    onnx_model = export_float_onnx(gm)
    rewrite = RewriteMatMulNBits(quantized, weight_param, accuracy_level)(onnx_model)
    if rewrite.unmatched:
        layer, why = next(iter(rewrite.unmatched.items()))
        raise ExportError(f"cannot write '{layer}' as MatMulNBits in the logits-only graph: {why}")
    _record_context(onnx_model, model)
    save_model(onnx_model, Path(path))
    del onnx_model
    # checked like the decoders: onnxruntime against the torch program with the same dequantized weights
    deviation = check_logits_only(Path(path), gm, quantized, accuracy_level)
    tolerance = FLOAT_TOLERANCE if accuracy_level == 0 else INT8_TOLERANCE
    if not deviation <= tolerance:
        remove_written(Path(path))
        raise ExportError(f"the logits-only graph differs from the torch program (relative logit error {deviation:.1e}, "
                          f"tolerance {tolerance:.0e}): nothing was written; please report this model")
    return Emitted("logits-only", len(rewrite.rewritten), [] if reason == "--no-kv-cache" else [warning], deviation,
                   deviation if accuracy_level == 0 else None)


def remove_written(path: Path) -> None:
    """A graph that failed its check: ``path`` and its data file go, so nothing wrong is left."""
    for written in path.parent.glob(path.name + "*"):
        written.unlink()


def check_logits_only(path: Path, gm: GraphModel, quantized, accuracy_level: int, tokens: int = 12,
                      seed: int = 0) -> float:
    """||onnx - torch|| / ||torch|| over the logits of ``tokens`` random ids (the length the
    export fixed, if it did) through the logits-only graph at ``path``."""
    from awq_graph.runtime import CompiledModel

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, gm.param_shape(token_table(gm))[0], (1, gm.fixed_seq or tokens), generator=gen)
    with torch.no_grad():
        ref = gm.run(ids, made=fake_quant_makers(gm, quantized)).float().numpy()
    got = CompiledModel(path, threads=1, prepack=accuracy_level != 0).logits(ids.numpy()).numpy()
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))


def _write_generic(gm: GraphModel, quantized, weight_param, path: Path, model, accuracy_level: int,
                   why_not_fused: str) -> Emitted:
    """The generic KV-cache decoder (``awq_graph.emit.generic``), written and checked like the
    fused one: prefill and one-token steps against its cache in onnxruntime, with float
    activations (tight) and at the written accuracy level (loose), against the torch program
    with the same dequantized weights. Raises GenericUnsupported (nothing left at ``path``)."""
    onnx_model = export_cached_onnx(model, gm)
    rewrite = RewriteMatMulNBits(quantized, weight_param, accuracy_level)(onnx_model)
    if rewrite.unmatched:
        layer, why = next(iter(rewrite.unmatched.items()))
        raise GenericUnsupported(f"cannot write '{layer}' as MatMulNBits in its graph: {why}")
    _record_context(onnx_model, model)
    save_model(onnx_model, path)
    del onnx_model
    graphs = {accuracy_level: path}
    if accuracy_level != 0:
        graphs[0] = path.with_name(path.stem + ".check-float-activations.onnx")
        written = ir.load(path)
        SetAccuracyLevel(0)(written)
        ir.save(written, graphs[0])  # its tensors stay in path's data file
    try:
        deviations = check_decoder(graphs, gm, quantized, None, tokens=generic_check_tokens(model))
    except Exception as exc:
        deviations, failure = {0: float("inf")}, first_line(exc)
    else:
        failure = None
    finally:
        if accuracy_level != 0:
            graphs[0].unlink(missing_ok=True)
    at_level = deviations.get(accuracy_level, deviations[0])
    if failure or not (deviations[0] <= FLOAT_TOLERANCE and at_level <= INT8_TOLERANCE):
        remove_written(path)
        raise GenericUnsupported(f"it failed in onnxruntime ({failure})" if failure else
                                 f"it differs from the torch program (relative logit error {deviations[0]:.1e}, "
                                 f"{at_level:.1e} at accuracy level {accuracy_level})")
    warning = (f"no fused KV-cache decoder for this model ({why_not_fused}): wrote the generic KV-cache decoder "
               "(torch.onnx of the model with its cache)")
    return Emitted("generic-kv-decoder", len(rewrite.rewritten), [] if why_not_fused == "--generic-decoder" else [warning],
                   at_level, deviations[0])


def generic_check_tokens(model, tokens: int = 12, longest: int = 128) -> int:
    """The prefill length of the generic decoder's check: past a sliding window when the window
    is short enough to run (so the steps after it attend through the window's mask), else 12."""
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    return window + 2 if isinstance(window, int) and tokens <= window + 2 <= longest else tokens


def checked_layers(gm: GraphModel, model) -> list[int]:
    """The decoder layers the check runs: the first two, the last, and the first of each kind of
    attention (gemma's local and global layers); every layer of a model whose layers are not one
    program (a dense first layer before MoE ones)."""
    stages = Stages(gm)
    n = stages.n
    kinds = list(getattr(getattr(model, "config", None), "layer_types", None) or [])[:n]
    chosen = sorted({0, min(1, n - 1), n - 1} | {kinds.index(k) for k in set(kinds)})
    return chosen if all(stages.alike(0, i) for i in chosen) else list(range(n))


def over_written_tensors(model: ir.Model, path: Path) -> ir.Model:
    """``model`` with each initializer replaced by the tensor of the same name in the written
    model at ``path`` (read from its data file only when run): the check runs the bytes the
    user gets, and nothing is written or held twice."""
    written = ir.load(path).graph.initializers
    for name, value in model.graph.initializers.items():
        source = written.get(name)
        if source is None or source.const_value.shape != value.const_value.shape or \
                source.const_value.dtype != value.const_value.dtype:
            raise RuntimeError(f"awq-graph bug: the checked graph's initializer '{name}' is not in {path.name} as built")
        value.const_value = source.const_value
    return model


def check_written_integers(model_path: Path, written: dict[str, tuple[str, SpilledWeight]]) -> int:
    """Compare the bytes of each written initializer (name -> (array kind, its integers)) in the
    model's external data with the digests the search recorded, segment by segment: a fused
    tensor's rows are its linears' rows in order, so its bytes split at their lengths. Reads one
    tensor at a time. Returns how many linears were compared; raises on the first mismatch."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    checked = set()
    for tensor in proto.graph.initializer:
        if tensor.name not in written:
            continue
        kind, spilled = written[tensor.name]
        info = {e.key: e.value for e in tensor.external_data}
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        if "location" in info:
            with open(Path(model_path).parent / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                data = f.read(int(info["length"]))
        else:  # a small tensor in the model file itself
            data = tensor.raw_data
        start = 0
        for seg in spilled.segments:
            size = int(np.prod(seg.where[kind][2])) * itemsize
            key = "scales16" if kind == "scales" and itemsize == 2 else kind
            if digest(data[start:start + size]) != seg.digests[key]:
                raise RuntimeError(f"awq-graph bug: the {kind} of '{seg.linear}' in {Path(model_path).name}'s "
                                   f"initializer '{tensor.name}' are not what the search chose")
            start += size
            checked.add(seg.linear)
        if start != len(data):
            raise RuntimeError(f"awq-graph bug: initializer '{tensor.name}' holds {len(data)} bytes, its linears {start}")
        del data
    missing = sorted(set(written) - {t.name for t in proto.graph.initializer})
    if missing:
        raise RuntimeError(f"awq-graph bug: the written model lacks the initializer '{missing[0]}'")
    return len(checked)


def _record_context(onnx_model: ir.Model, model) -> None:
    """The checkpoint's context length in the model's metadata, for the runtime's limits."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions:
        onnx_model.metadata_props[CONTEXT_KEY] = str(int(positions))


def decoder_support(model, group_size: int | None = None) -> str | None:
    """None when one of the KV-cache decoders fits ``model``; otherwise why none does."""
    family, reason = family_of(model)
    if family is None:
        return reason
    supports, _ = BLOCK_WRITERS[family.block]
    return supports(model, family, group_size)


def _why_no_decoder(model, kv_cache: bool, group_size: int | None) -> str | None:
    """None when the KV-cache decoder is to be written; otherwise why not."""
    if not kv_cache:
        return "--no-kv-cache"
    if kv_cache == "generic":
        return "--generic-decoder"
    return "no HF model object" if model is None else decoder_support(model, group_size)


def _refuse_untranslatable(gm: GraphModel, why_not_fused: str, tail: str = "") -> None:
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


def fake_quant_overrides(gm: GraphModel, quantized: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """Parameter name -> dequantized weight in the parameter's layout: the torch reference."""
    return {name: make() for name, make in fake_quant_makers(gm, quantized).items()}


def fake_quant_makers(gm: GraphModel, quantized: dict[str, QuantizedWeight]) -> dict[str, object]:
    """Parameter name -> a function making its dequantized weight (``GraphModel.run``'s ``made``:
    one dequantized weight in memory at a time)."""
    def maker(name):
        site, q = gm.linears[name], quantized[name]
        return lambda: site.stored(q.dequantize())
    return {gm.linears[n].weight: maker(n) for n in quantized}


def check_decoder(graphs: dict[int, Path], gm: GraphModel, quantized, quantized_table: TokenTable | None,
                  layers: list[int] | None = None, tokens: int = 12, decode_steps: int = 3,
                  seed: int = 0) -> dict[int, float]:
    """Per decoder file (by its accuracy level), ||onnx - torch|| / ||torch|| over the logits of a
    prefill of ``tokens`` random ids followed by ``decode_steps`` one-token steps against the
    cache; the torch reference (the program run through ``layers``, None: all) is computed once."""
    from awq_graph.runtime import CompiledModel

    lookup = token_lookup(gm)
    table_name = gm.param_of(lookup.args[0])
    gen = torch.Generator().manual_seed(seed)
    if gm.fixed_seq:  # the torch program runs only at the length its export fixed
        tokens = gm.fixed_seq - decode_steps
    ids = torch.randint(0, gm.param_shape(table_name)[0], (1, tokens + decode_steps), generator=gen)
    fixed = {}
    if quantized_table is not None:  # the lookup reads an int4 copy of the table (tied or not)
        fixed[lookup] = quantized_table.rows(ids)
    with torch.no_grad():  # each dequantized weight made where it is read, then dropped
        made = fake_quant_makers(gm, quantized)
        ref = (gm.run(ids, fixed=fixed, made=made) if layers is None else
               run_layers(gm, ids, layers, made=made, fixed=fixed)).float().numpy()
    deviations = {}
    for level, path in graphs.items():
        # Float activations need no prepacked copies (the head of an 8B model would be held twice,
        # 2.1 GB of float32); int8 activations do: without prepacking MatMulNBits computes in float
        # whatever its level (measured: the same deviation at levels 0 and 4).
        got = CompiledModel(path, threads=1, prepack=level != 0).logits_with_cache(ids.numpy(), prefill=tokens)
        deviations[level] = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))
    return deviations
