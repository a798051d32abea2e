"""compile(): the stages in order."""
from __future__ import annotations

import json
import os
import warnings as pywarnings
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from .. import calib as calibration
from ..core.analysis import token_table
from ..core.errors import ConfigError, InputError, error_line
from ..core.group_fit import GroupFit
from ..core.heap import give_back_freed_memory
from ..core.ranks import ONE, RankFailed, Ranks
from ..emit import plan_graph, write_onnx
from ..compressed import checkpoint_dtype, export_refusal, write_compressed_checkpoint
from ..emit.deploy import write_runtime_files
from ..export import StreamingUnsupported, export_model
from ..load import check_finite, load_checked_model, load_tokenizer, open_skeleton, refuse_quantized
from ..match import match
from ..outdir import atomic_out_dir, check_free_space, check_out_dir, claim_out_dir, output_path, remove_stale
from ..head_table import quantize_head, quantize_token_table, shares_head, token_table_of_head
from ..search import SearchResult, awq_search, hold_integers, rtn
from ..core.spill import IntegerSpill
from .calibration import calibration_ids, held_aside
from .checks import head_search, least_bytes, same_model_on_every_rank, same_on_every_rank
from .options import CompileOptions, CompileResult, options_from
from .report import Laps, finite, graph_report, memory_report, ranks_report, reset_device_peak, search_report


def compile(model, calib=None, out_dir="out", options: CompileOptions | None = None, *, tokenizer=None,
            progress=None, warn=None, ranks: Ranks | None = None, **option_fields) -> CompileResult:
    """Quantize a causal LM with AWQ and write an int4 MatMulNBits ONNX model to ``out_dir``.

    model: a ``PreTrainedModel`` (then pass ``tokenizer`` to have it saved) or a path to a
    checkpoint folder or .gguf file. calib: None or "self" (text sampled from the model), a
    .txt/.jsonl path, or token tensors (a tensor, a list, a dataloader). options: a
    ``CompileOptions``, or its fields as keywords (``scheme="uint4_wo_64", n_samples=32``).
    Nothing is written to ``out_dir`` until everything succeeded. ``warn(message)`` is called
    with each warning as soon as it is known (default: ``warnings.warn``); the report lists them.

    ranks: ``Ranks(group, store)`` over an initialized torch.distributed process group: every
    process of the group calls ``compile`` with the same arguments; each runs its share of the
    calibration samples, all make the same choices, and rank 0 alone writes ``out_dir`` (the
    others return no files). An error on any rank is raised on every rank, naming the rank.
    """
    opts = options if options is not None else options_from(option_fields)
    ranks = ranks or ONE
    given, was_training = model, getattr(model, "training", None)
    try:
        usable = usable_model(model)
        with ExitStack() as claims:  # OUT (and export_hf's DIR) are this run's until it ends
            return _compile(usable, calib, out_dir, opts, tokenizer, progress, warn, ranks, claims,
                            owned=usable is not model)
    except RankFailed:
        raise
    except BaseException as exc:  # the others are told, and stop at their next collective
        ranks.fail(error_line(exc))
        raise
    finally:
        if was_training is not None:  # the caller's model is not modified, its mode neither
            given.train(was_training)


def usable_model(model):
    """A checkpoint path as it is; a caller's model checked (a module with values on the CPU) and,
    when stored in bfloat16 or float16 (what ``from_pretrained`` usually returns), copied to
    float32: the copy is what compile would have cloned anyway, and the graph is traced in the
    dtype the search runs in."""
    import copy

    import torch

    if isinstance(model, (str, os.PathLike)):
        return model
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model: give a checkpoint folder or .gguf path, or a transformers causal LM, not a "
                         f"{type(model).__name__}")
    devices = {p.device.type for p in model.parameters()}
    if "meta" in devices:
        raise InputError("model: its parameters are on the meta device (shapes without values): load it with its "
                         "weights, or give its checkpoint path (a path is read one tensor at a time)")
    if devices - {"cpu"}:
        raise InputError(f"model: its parameters are on {', '.join(sorted(devices - {'cpu'}))}: give it on the CPU "
                         "(`device` says where the search runs)")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        return copy.deepcopy(model).to(torch.float32)  # its config keeps the dtype (what export_hf writes)
    return model


@dataclass
class Outputs:
    """Where compile writes: OUT, and ``export_hf``'s DIR (None without it)."""

    out_dir: Path
    hf_dir: Path | None


@dataclass
class Loaded:
    """The model as loaded: its graph's source (the skeleton of a streamed checkpoint, or the
    whole model), its tokenizer, and why it is whole when it is."""

    model: object
    tokenizer: object
    source: Path | None
    skeleton: object
    whole_because: str | None
    notes: list[str]  # the checkpoint's tensors that no parameter reads


@dataclass
class Exported:
    """The exported program and the graphs to write; the model, reloaded whole when the graph
    to write is exported from the model in memory."""

    gm: object
    plan: object
    model: object
    whole_because: str | None
    notes: list[str]


@dataclass
class Calibrated:
    ids: object  # (n_samples, seqlen) token ids for the search
    held: object  # the held-aside samples, or None
    source: str
    notes: list[str]


@dataclass
class Searched:
    """What the search (or round to nearest) made, and the head and token table's integers."""

    result: SearchResult
    quantized: dict
    table: object


def _compile(model, calib, out_dir, opts: CompileOptions, tokenizer, progress, warn, ranks: Ranks,
             claims: ExitStack, owned: bool = False) -> CompileResult:
    """The stages in order; rank 0 alone writes. ``owned``: ``model`` is compile's own copy of the
    caller's (the folds may edit it in place)."""
    calib_file = calib if isinstance(calib, (str, os.PathLike)) and str(calib) != "self" else None
    outputs = claim_outputs(out_dir, opts, (model, calib_file), ranks, claims)
    if calib_file is not None and not opts.rtn_only:
        calibration.check_text_file(calib_file, hint=" (give a .txt or .jsonl file, or 'self')")
    if opts.rtn_only and not ranks.leader:  # no calibration to share: rank 0 compiles alone
        ranks.wait()  # the checks of every rank
        ranks.wait()  # rank 0's OUT (or its error)
        return CompileResult(outputs.out_dir, [], {"rank": ranks.rank})
    lap = Laps()
    reset_device_peak(opts.device)
    loaded = load(model, tokenizer, opts, ranks)
    lap("load")
    exported = export(loaded, opts, owned)
    opts = opts.with_head_resolved(exported.gm)
    warnings = graph_warnings(exported, opts, outputs)
    least = check_space(exported.gm, opts, outputs) if ranks.leader else None
    lap("export")
    calibrated = None
    if not opts.rtn_only:
        calibrated = calibrate(calib, loaded, exported, opts, progress, ranks, outputs)
        warnings += calibrated.notes
        lap("calibration")
    found = match_groups(exported.gm, opts, ranks, progress)
    per_layer, match_warnings = found.for_search()
    warnings = match_warnings + warnings + fewer_samples(calibrated, opts)
    warn = _warner(warn, ranks)
    for message in warnings:  # before the long search, not after it
        warn(message)
    lap("match")
    ranks.wait()  # every rank is ready (or one failed: every rank stops here with its error)
    if not ranks.leader:
        awq_search(exported.gm, per_layer, calibrated.ids, opts.search_options(), head=head_search(exported.gm, opts),
                   ranks=ranks)
        ranks.wait()  # rank 0's OUT (or its error)
        return CompileResult(outputs.out_dir, [], {"rank": ranks.rank, "timings_s": lap.timings})
    # export_hf's DIR is written as OUT is, and put in place with it (just before it)
    with atomic_out_dir(outputs.out_dir, opts.overwrite) as tmp, (
            atomic_out_dir(outputs.hf_dir, opts.overwrite, "`export_hf`") if outputs.hf_dir is not None
            else nullcontext()) as hf_tmp:
        spill = IntegerSpill(tmp / ".integers.spill")  # each layer's integers leave memory as it finishes
        try:
            searched = search(exported.gm, per_layer, calibrated, opts, progress, spill, ranks)
            if searched.result.guard is not None and searched.result.guard.alarming:  # never silently
                warnings.append(searched.result.guard.summary())
                warn(warnings[-1])
            lap("search")
            emitted = write_onnx(exported.gm, searched.quantized, tmp / "model.onnx", model=exported.model,
                                 accuracy_level=opts.accuracy_level, act_dtype=opts.act_dtype,
                                 quantized_table=searched.table, plan=exported.plan)
            lap("emit")
            exported_hf = None
            if hf_tmp is not None:
                exported_hf = {"folder": str(outputs.hf_dir), **write_compressed_checkpoint(
                    hf_tmp, exported.gm, exported.model, searched.result.quantized, opts.scheme,
                    checkpoint_dtype(exported.model, loaded.source), loaded.tokenizer, progress)}
                lap("export_hf")
        finally:
            spill.close()
        for message in emitted.warnings:
            warn(message)
        runtime_files = write_folder(tmp, loaded, exported, found)
        report = {**search_report(searched.result, opts, emitted.quantized_linears, lap.timings,
                                  None if calibrated is None else calibrated.ids, found.skipped),
                  "graph": graph_report(emitted, opts, runtime_files),
                  "calibration_source": None if calibrated is None else calibrated.source,
                  "ranks": ranks_report(ranks, None if calibrated is None else calibrated.ids, opts),
                  "weights": {"streamed": exported.gm.streamed, "loaded_whole_because": exported.whole_because},
                  "export": {"fixed_seq": exported.gm.fixed_seq},
                  "export_hf": exported_hf,
                  "warnings": warnings + emitted.warnings,
                  "onnx_bytes": sum(p.stat().st_size for p in tmp.glob("model.onnx*")),
                  "least_weight_bytes": {"int4": least[0], "other": least[1]},  # the free-space check's bound
                  **memory_report(lap, opts.device)}
        (tmp / "report.json").write_text(json.dumps(finite(report), indent=2, allow_nan=False) + "\n")
    ranks.wait()  # the others return once OUT is in place
    files = sorted(p for p in outputs.out_dir.iterdir() if p.is_file())
    return CompileResult(outputs.out_dir, files, report)


def claim_outputs(out_dir, opts: CompileOptions, inputs: tuple, ranks: Ranks, claims: ExitStack) -> Outputs:
    """OUT and DIR resolved and, on rank 0 (which alone writes), checked and claimed for this run
    (``claims`` holds them until it ends): never one of the inputs, never another run's."""
    out_dir = output_path(out_dir) if ranks.leader else Path(out_dir)
    hf_dir = None if opts.export_hf is None else (
        output_path(opts.export_hf, "`export_hf`") if ranks.leader else Path(opts.export_hf))
    if ranks.leader:
        paths = tuple(x for x in inputs if isinstance(x, (str, os.PathLike)))
        remove_stale(out_dir)  # first: an OUT a killed run had set aside is back before OUT is checked
        check_out_dir(out_dir, opts.overwrite, paths)
        claims.enter_context(claim_out_dir(out_dir))
        if hf_dir is not None:
            remove_stale(hf_dir)
            check_out_dir(hf_dir, opts.overwrite, paths, option="`export_hf`", outputs=(out_dir,))
            claims.enter_context(claim_out_dir(hf_dir, "`export_hf`"))
    return Outputs(out_dir, hf_dir)


def load(model, tokenizer, opts: CompileOptions, ranks: Ranks) -> Loaded:
    """A checkpoint path opened (streamed: its skeleton; else loaded whole) and checked against its
    config; a model object as given. Every rank's model is then compared with rank 0's."""
    loaded_here = isinstance(model, (str, os.PathLike))
    source = Path(model) if loaded_here else None
    skeleton, whole_because, notes = None, None if loaded_here else "a model object was given", []
    if loaded_here:
        refuse_quantized(source)
        skeleton, whole_because = open_skeleton(source) if opts.stream else (None, "`stream=False`")
        if skeleton:
            give_back_freed_memory()
            model, notes = skeleton.model, skeleton.notes
        else:
            model, notes = load_checked_model(source)
        tokenizer = load_tokenizer(source)
    model.eval()
    check_finite(model)  # a streamed checkpoint's tensors are checked as they are read
    same_model_on_every_rank(model, skeleton, opts, ranks)
    context = getattr(model.config, "max_position_embeddings", None)
    if not opts.rtn_only and context and opts.seqlen > context:
        raise InputError(f"seqlen {opts.seqlen} (`seqlen`) is longer than the model's context of {context} positions")
    return Loaded(model, tokenizer, source, skeleton, whole_because, notes)


def export(loaded: Loaded, opts: CompileOptions, owned: bool) -> Exported:
    """torch.export of the model, and the plan of the graphs to write (a graph nobody can write
    fails here). A streamed model whose graph is exported from the model in memory is loaded
    whole and exported again. The folds edit the weights in place: a model loaded here shares
    them, a caller's gets copies."""
    model, whole_because, notes = loaded.model, loaded.whole_because, loaded.notes
    try:
        gm = export_model(model, private=not (loaded.source is not None or owned), skeleton=loaded.skeleton,
                          seqlen=opts.seqlen)
        plan = plan_graph(gm, model, opts.kv_cache, opts.scheme.group_size)
        if loaded.skeleton and not plan.kv_decoder:
            raise StreamingUnsupported(f"the logits-only graph ({plan.reason}) is exported from the model in memory")
    except StreamingUnsupported as exc:
        whole_because = str(exc)
        model, notes = load_checked_model(loaded.source)  # the tokenizer is loaded already
        gm = export_model(model, private=False, seqlen=opts.seqlen)
        plan = plan_graph(gm, model, opts.kv_cache, opts.scheme.group_size)
    return Exported(gm, plan, model, whole_because, notes)


def graph_warnings(exported: Exported, opts: CompileOptions, outputs: Outputs) -> list[str]:
    """What the graph says before the long work: an export DIR cannot take this graph, a group
    wider than every input or a head group wider than the head (refused, ``GroupFit``); groups
    that pad rows, a length the export fixed, tensors no parameter reads (warnings)."""
    gm = exported.gm
    fit = GroupFit.of(gm, opts.scheme.group_size)
    if outputs.hf_dir is not None:
        refusal = export_refusal(gm, fit, opts.scheme, head_search(gm, opts) is not None)
        if refusal:
            raise InputError(refusal)
    refusal = fit.refusal() or (fit.head_refusal(opts.head_scheme.group_size) if opts.quantize_lm_head else None)
    if refusal:
        raise InputError(refusal)
    warnings = exported.notes + fit.warnings()
    if gm.fixed_seq:
        warnings.append(f"torch.export fixed this architecture's sequence length to {gm.fixed_seq} (`seqlen`; "
                        "its dynamic export failed): the analysis and the search run at that length; a KV-cache "
                        "decoder takes one token per step, a logits-only graph at most that many tokens")
    return warnings


def check_space(gm, opts: CompileOptions, outputs: Outputs) -> tuple[int, int]:
    """Before the long work: a disk too full for OUT (and DIR) is refused. Returns the least
    bytes of int4 integers and of other weights OUT takes."""
    nibbles, others = least_bytes(gm, opts)
    copies = 3 if opts.held else 1  # the held-aside check's candidate models: up to three sets of integers
    out_dir = outputs.out_dir
    needs = [(out_dir, (1 + copies) * nibbles + others, f"{out_dir}: the int4 integers, {nibbles / 2**30:.2f} GiB, "
              f"{copies} time(s) in a scratch file and once in model.onnx.data, beside {others / 2**30:.2f} GiB of "
              "other weights")]
    if outputs.hf_dir is not None:
        needs.append((outputs.hf_dir, nibbles + others, f"{outputs.hf_dir}: the `export_hf` checkpoint"))
    check_free_space(needs)
    return nibbles, others


def calibrate(calib, loaded: Loaded, exported: Exported, opts: CompileOptions, progress, ranks: Ranks,
              outputs: Outputs) -> Calibrated:
    """The calibration ids (checked against the token table, the same on every rank) and the
    held-aside samples past them."""
    gm = exported.gm
    ids, source, notes = calibration_ids(calib, exported.model, loaded.tokenizer, opts, progress, loaded.source,
                                         streamed=gm.streamed, ranks=ranks, gm=gm, plan=exported.plan,
                                         out_dir=outputs.out_dir)
    calibration.check_ids_fit(ids, int(gm.param_shape(token_table(gm))[0]), source)
    ids, held, note = held_aside(ids, opts, source)
    same_on_every_rank(ids, source, ranks)
    return Calibrated(ids, held, source, notes + ([note] if note else []))


def match_groups(gm, opts: CompileOptions, ranks: Ranks, progress):
    """The scaling groups: derived (and proved by folding random scales, by rank 0; the others take
    its verdict) or the given config's, checked. Round-to-nearest uses none."""
    verify = opts.config is None and not opts.rtn_only
    found = match(gm, opts.config, verify=verify and ranks.leader, progress=progress)
    if verify and ranks.world > 1:
        found = replace(found, verification=ranks.leader_object(found.verification))
    if found.faults:
        raise ConfigError("config does not fit the model: " + "; ".join(found.faults))
    return found


def fewer_samples(calibrated: Calibrated | None, opts: CompileOptions) -> list[str]:
    if calibrated is None or calibrated.ids.shape[0] >= opts.n_samples:
        return []
    return [f"calibration from {calibrated.source} gave {calibrated.ids.shape[0]} samples of {opts.seqlen} tokens, "
            f"fewer than the {opts.n_samples} asked (`n_samples`)"]


def _warner(warn, ranks: Ranks):
    if not ranks.leader:
        return lambda message: None  # rank 0 says them
    return warn or (lambda message: pywarnings.warn(message, stacklevel=4))  # the caller of compile()


def search(gm, per_layer, calibrated: Calibrated | None, opts: CompileOptions, progress, spill: IntegerSpill,
           ranks: Ranks) -> Searched:
    """The decoder layers' integers (AWQ, or round to nearest), each layer's spilled as it
    finishes; then the head's and the token table's when they are quantized."""
    head = head_search(gm, opts)
    result = (rtn(gm, opts.scheme, progress, keep=spill.put) if opts.rtn_only else
              awq_search(gm, per_layer, calibrated.ids, opts.search_options(), progress=progress, keep=spill.put,
                         head=head, ranks=ranks, held=calibrated.held))
    quantized, table = dict(result.quantized), None
    if opts.quantize_lm_head:
        name = head[0].layers[0] if head else None
        if head is None:  # held as the layers' are: its bytes in the file checked against what was made
            name, head_integers = quantize_head(gm, opts.head_scheme)
            quantized[name] = hold_integers(name, head_integers, spill.put)
        table = (token_table_of_head(name, quantized[name], result.folded)
                 if shares_head(gm, opts.head_scheme, opts.table_scheme) else quantize_token_table(gm, opts.table_scheme))
    return Searched(result, quantized, table)


def write_folder(tmp: Path, loaded: Loaded, exported: Exported, found) -> list[str]:
    """Beside the graph: the tokenizer, the runtimes' files, the config used. Returns the
    runtimes' files written."""
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(tmp)
    runtime_files = write_runtime_files(tmp, exported.model, loaded.tokenizer)  # onnxruntime-genai's and optimum's
    (tmp / "awq_config.json").write_text(json.dumps(found.quark, indent=2) + "\n")
    return runtime_files
