"""The pipeline driver: load -> export -> plan the graph -> calibrate -> match -> search (fold,
clip, quantize per layer) -> quantize the head and the token table -> emit -> the output folder.

``compile`` is the Python API; the CLI is a thin layer over it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import time
import warnings as pywarnings
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from . import calib as calibration
from .core.analysis import output_head, quantizable_linears, token_table
from .core.errors import ConfigError, InputError, SchemeError, error_line
from .core.heap import give_back_freed_memory
from .core.numerics import QuantScheme, n_groups
from .core.ranks import ONE, RankFailed, Ranks
from .core.records import read_quark_config
from .emit import plan_graph, write_onnx
from .compressed import checkpoint_dtype, export_refusal, write_compressed_checkpoint
from .emit.deploy import write_runtime_files
from .export import StreamingUnsupported, export_model
from .fingerprint import WHAT, model_fingerprint, options_fingerprint
from .interrupt import checkpoint
from .load import (check_finite, load_checked_model, load_float_model, load_tokenizer, open_skeleton, refuse_quantized,
                   sampler_dtype, tokenizer_files)
from .match import head_group, match
from .outdir import atomic_out_dir, check_free_space, check_out_dir, claim_out_dir, output_path, remove_stale
from .head_table import quantize_head, quantize_token_table, shares_head, token_table_of_head
from .sampling import can_sample, sampled_ids
from .search import SCREENS, SearchOptions, SearchResult, awq_search, rtn
from .core.spill import IntegerSpill

ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# the held-aside check's tokens by default (``CompileOptions.held``): a few thousand tokens put the
# standard error of a per-token NLL difference under the differences it has to decide
HELD_TOKENS = 2048
MAX_GRID_POINTS = 200  # the scale grid's ratios: beyond AWQ's 20 the losses barely move while the grid time grows


@dataclass(frozen=True)
class CompileOptions:
    """Everything ``compile`` can be asked, checked when built.

    scheme: a QuantScheme or its name (``uint4_wo_128``). config: None (derive the scaling
    groups from the graph), a Quark AWQ config dict, or a path to one. quantize_lm_head: lm_head
    as MatMulNBits of ``lm_head_bits`` (8 by default, rounded to nearest; 4 bits are searched with
    calibration, at ``lm_head_group_size``) and, in the KV-cache decoder, the token table as int4
    GatherBlockQuantized (a tied 4-bit head's integers themselves). act_dtype: "float32" or
    "float16" activations (KV-cache decoder). kv_cache: True: the fused KV-cache decoder where the
    model family has one, else the generic one (``awq_graph.emit.generic``) where transformers
    keeps the model's cache in its standard layers, else logits-only; "generic": the generic one
    even where a fused one fits (to compare them); False: logits-only. loss_tokens: tokens of the search's loss subsample.
    device: where the search runs, "cpu", "cuda" (or "cuda:N") or "auto" (a CUDA GPU when torch
    sees one); the rest of the compile stays on the CPU. stream: a checkpoint given by path is
    read one tensor at a time (``awq_graph.weights``) where it can be, so memory holds about one
    decoder layer in float32 whatever the depth; False loads the whole model in float32 first.
    grid_screen: "auto", "bfloat16", "sketch" or "off" (``SearchOptions.screen``: the scale grid's
    losses screened cheaply, the choice made on float32 losses). grid_points: the scale grid's
    ratios besides the identity (AWQ's n_grid, 20; the search's grid time is about proportional). export_hf: a second folder, written as OUT is,
    holding the AWQ-scaled model as a compressed-tensors "pack-quantized" checkpoint with the same
    integers (``awq_graph.compressed``), for transformers and vLLM. held_samples:
    calibration samples beyond ``n_samples`` that the search never sees, on which the held-aside
    check (``awq_graph.guard``) compares the searched model with round-to-nearest, per layer and by
    end-to-end NLL, and writes the better (None: ``HELD_TOKENS`` tokens' worth, at most a quarter
    of ``n_samples``; 0: no check).
    """

    scheme: QuantScheme | str = "uint4_wo_128"
    config: dict | str | os.PathLike | None = None
    n_samples: int = 128
    seqlen: int = 512
    clip: bool = True
    rtn_only: bool = False
    seed: int = 0
    accuracy_level: int = 4
    overwrite: bool = False
    quantize_lm_head: bool = False
    lm_head_bits: int = 8
    lm_head_group_size: int | None = None  # None: the scheme's
    act_dtype: str = "float32"
    kv_cache: bool | str = True
    loss_tokens: int | None = None
    device: str = "auto"
    stream: bool = True
    grid_screen: str = "auto"
    grid_points: int = 20
    export_hf: str | os.PathLike | None = None
    held_samples: int | None = None  # None: HELD_TOKENS' worth of samples; 0: no held-aside check
    self_sampler: str = "int8"  # what --calib self samples with: "int8" (awq_graph.sampling) or "transformers"

    def __post_init__(self):
        object.__setattr__(self, "device", resolve_device(self.device))
        if not isinstance(self.scheme, QuantScheme):
            object.__setattr__(self, "scheme", QuantScheme.parse(str(self.scheme)))
        if isinstance(self.config, (str, os.PathLike)):
            object.__setattr__(self, "config", read_quark_config(self.config))
        if self.act_dtype not in ("float32", "float16"):
            raise InputError(f"--act-dtype {self.act_dtype}: choose float32 or float16")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise InputError(f"--accuracy-level {self.accuracy_level}: choose one of {list(ACCURACY_LEVELS)}")
        if self.lm_head_bits not in (4, 8):
            raise InputError(f"--lm-head-bits {self.lm_head_bits}: choose 4 or 8")
        if self.lm_head_group_size is not None:
            try:
                QuantScheme(self.lm_head_bits, self.lm_head_group_size)
            except SchemeError as exc:
                raise InputError(f"--lm-head-group-size {self.lm_head_group_size}: {exc}") from None
        if self.n_samples < 1:
            raise InputError(f"--n-samples {self.n_samples}: give at least 1 calibration sample")
        if self.seqlen < 2:
            raise InputError(f"--seqlen {self.seqlen}: a calibration sample needs at least 2 tokens")
        if self.loss_tokens is not None and self.loss_tokens < 1:
            raise InputError(f"--loss-tokens {self.loss_tokens}: give at least 1")
        if not 1 <= self.grid_points <= MAX_GRID_POINTS:
            raise InputError(f"--grid {self.grid_points}: give 1 to {MAX_GRID_POINTS} ratios (the search's grid time "
                             f"grows with them: AWQ's 20 is the default, {MAX_GRID_POINTS} takes about 10 times as long)")
        if self.held_samples is not None and self.held_samples < 0:
            raise InputError(f"--held-samples {self.held_samples}: give 0 (no held-aside check) or more")
        if self.grid_screen not in SCREENS:
            raise InputError(f"--grid-screen {self.grid_screen}: choose one of {', '.join(SCREENS)}")
        if self.self_sampler not in ("int8", "transformers"):
            raise InputError(f"--self-sampler {self.self_sampler}: choose int8 or transformers")
        if self.kv_cache not in (True, False, "generic"):
            raise InputError(f"kv_cache={self.kv_cache!r}: give True, False or 'generic'")

    @property
    def held(self) -> int:
        """Calibration samples held aside from the search for its check (``awq_graph.guard``)."""
        if self.rtn_only:
            return 0
        if self.held_samples is not None:
            return self.held_samples
        return min(-(-HELD_TOKENS // self.seqlen), -(-self.n_samples // 4))  # at most a quarter more samples

    @property
    def head_scheme(self) -> QuantScheme:
        return QuantScheme(self.lm_head_bits, self.lm_head_group_size or self.scheme.group_size, self.scheme.symmetric)

    def search_options(self) -> SearchOptions:
        extra = {"loss_tokens": self.loss_tokens} if self.loss_tokens else {}
        return SearchOptions(scheme=self.scheme, n_grid=self.grid_points, clip=self.clip, device=self.device,
                             screen=self.grid_screen, **extra)


@dataclass
class CompileResult:
    out_dir: Path
    files: list[Path]  # empty on a rank other than 0: rank 0 alone writes OUT
    report: dict = field(default_factory=dict)


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
    opts = options if options is not None else _options(option_fields)
    ranks = ranks or ONE
    given, was_training = model, getattr(model, "training", None)
    try:
        usable = _usable_model(model)
        with ExitStack() as claims:  # OUT (and --export-hf's DIR) are this run's until it ends
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


def _usable_model(model):
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
                         "(--device / device= says where the search runs)")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        return copy.deepcopy(model).to(torch.float32)  # its config keeps the dtype (what --export-hf writes)
    return model


def _compile(model, calib, out_dir, opts: CompileOptions, tokenizer, progress, warn, ranks: Ranks,
             claims: ExitStack, owned: bool = False) -> CompileResult:
    """``owned``: ``model`` is compile's own copy of the caller's (the folds may edit it in place)."""
    calib_file = calib if isinstance(calib, (str, os.PathLike)) and str(calib) != "self" else None
    out_dir = output_path(out_dir) if ranks.leader else Path(out_dir)
    hf_dir = None if opts.export_hf is None else (
        output_path(opts.export_hf, "--export-hf") if ranks.leader else Path(opts.export_hf))
    if ranks.leader:  # rank 0 alone writes OUT
        inputs = tuple(x for x in (model, calib_file) if isinstance(x, (str, os.PathLike)))
        remove_stale(out_dir)  # first: an OUT a killed run had set aside is back before OUT is checked
        check_out_dir(out_dir, opts.overwrite, inputs)
        claims.enter_context(claim_out_dir(out_dir))
        if hf_dir is not None:
            remove_stale(hf_dir)
            check_out_dir(hf_dir, opts.overwrite, inputs, flag="--export-hf", outputs=(out_dir,))
            claims.enter_context(claim_out_dir(hf_dir, "--export-hf"))
    if calib_file is not None and not opts.rtn_only:
        calibration.check_text_file(calib_file, hint=" (give a .txt or .jsonl file, or 'self')")
    if opts.rtn_only and not ranks.leader:  # no calibration to share: rank 0 compiles alone
        ranks.wait()  # the checks of every rank
        ranks.wait()  # rank 0's OUT (or its error)
        return CompileResult(out_dir, [], {"rank": ranks.rank})
    lap = _Laps()
    _reset_device_peak(opts.device)

    loaded_here = isinstance(model, (str, os.PathLike))
    source = Path(model) if loaded_here else None
    skeleton, whole_because = None, None if loaded_here else "a model object was given"
    checkpoint_notes: list[str] = []  # its tensors that no parameter reads
    if loaded_here:
        refuse_quantized(source)
        skeleton, whole_because = open_skeleton(source) if opts.stream else (None, "--no-stream")
        if skeleton:
            give_back_freed_memory()
            model, checkpoint_notes = skeleton.model, skeleton.notes
        else:
            model, checkpoint_notes = load_checked_model(source)
        tokenizer = load_tokenizer(source)
    model.eval()
    check_finite(model)  # a streamed checkpoint's tensors are checked as they are read
    _same_model_on_every_rank(model, skeleton, opts, ranks)
    context = getattr(model.config, "max_position_embeddings", None)
    if not opts.rtn_only and context and opts.seqlen > context:
        raise InputError(f"seqlen {opts.seqlen} (--seqlen) is longer than the model's context of {context} positions")
    lap("load")
    # The folds edit the weights in place: a model we loaded ourselves shares them, a caller's gets copies.
    try:
        gm = export_model(model, private=not (loaded_here or owned), skeleton=skeleton, seqlen=opts.seqlen)
        plan = plan_graph(gm, model, opts.kv_cache, opts.scheme.group_size)  # a graph nobody can write fails here
        if skeleton and not plan.kv_decoder:
            raise StreamingUnsupported(f"the logits-only graph ({plan.reason}) is exported from the model in memory")
    except StreamingUnsupported as exc:
        skeleton, whole_because = None, str(exc)
        model, checkpoint_notes = load_checked_model(source)  # the tokenizer is loaded already
        gm = export_model(model, private=False, seqlen=opts.seqlen)
        plan = plan_graph(gm, model, opts.kv_cache, opts.scheme.group_size)
    if hf_dir is not None:
        refusal = export_refusal(gm, opts.scheme, _head_search(gm, opts) is not None)
        if refusal:
            raise InputError(refusal)
    graph_warnings = checkpoint_notes + _group_fit(gm, opts.scheme.group_size)
    _check_head_group(gm, opts)
    if gm.fixed_seq:
        graph_warnings.append(f"torch.export fixed this architecture's sequence length to {gm.fixed_seq} (--seqlen; "
                              "its dynamic export failed): the analysis and the search run at that length; a KV-cache "
                              "decoder takes one token per step, a logits-only graph at most that many tokens")
    if ranks.leader:  # before the long work: a disk too full for OUT
        nibbles, others = _least_bytes(gm, opts)
        copies = 3 if opts.held else 1  # the held-aside check's candidate models: up to three sets of integers
        needs = [(out_dir, (1 + copies) * nibbles + others, f"{out_dir}: the int4 integers, {nibbles / 2**30:.2f} GiB, "
                  f"{copies} time(s) in a scratch file and once in model.onnx.data, beside {others / 2**30:.2f} GiB of "
                  "other weights")]
        if hf_dir is not None:
            needs.append((hf_dir, nibbles + others, f"{hf_dir}: the --export-hf checkpoint"))
        check_free_space(needs)
    lap("export")
    calib_ids, calib_source, held_ids = None, None, None
    if not opts.rtn_only:
        calib_ids, calib_source, calib_notes = _calibration(calib, model, tokenizer, opts, progress, source,
                                                            streamed=gm.streamed, ranks=ranks, gm=gm, plan=plan,
                                                            out_dir=out_dir)
        graph_warnings += calib_notes
        calibration.check_ids_fit(calib_ids, int(gm.param_shape(token_table(gm))[0]), calib_source)
        calib_ids, held_ids, note = _held_aside(calib_ids, opts, calib_source)
        graph_warnings += [note] if note else []
        _same_on_every_rank(calib_ids, calib_source, ranks)
        lap("calibration")
    # the derived groups are proved by folding random scales (by rank 0; the others take its
    # verdict); round-to-nearest uses no group
    verify = opts.config is None and not opts.rtn_only
    found = match(gm, opts.config, verify=verify and ranks.leader, progress=progress)
    if verify and ranks.world > 1:
        found = replace(found, verification=ranks.leader_object(found.verification))
    if found.faults:
        raise ConfigError("config does not fit the model: " + "; ".join(found.faults))
    per_layer, warnings = found.for_search()
    warnings += graph_warnings
    if calib_ids is not None and calib_ids.shape[0] < opts.n_samples:
        warnings.append(f"calibration from {calib_source} gave {calib_ids.shape[0]} samples of {opts.seqlen} tokens, "
                        f"fewer than the {opts.n_samples} asked (n_samples)")
    warn = warn or (lambda message: pywarnings.warn(message, stacklevel=4))  # the caller of compile()
    if not ranks.leader:
        warn = lambda message: None  # noqa: E731 (rank 0 says them)
    for message in warnings:  # before the long search, not after it
        warn(message)
    lap("match")
    ranks.wait()  # every rank is ready (or one failed: every rank stops here with its error)
    if not ranks.leader:
        awq_search(gm, per_layer, calib_ids, opts.search_options(), head=_head_search(gm, opts), ranks=ranks)
        ranks.wait()  # rank 0's OUT (or its error)
        return CompileResult(out_dir, [], {"rank": ranks.rank, "timings_s": lap.timings})
    # DIR of --export-hf is written as OUT is, and put in place with it (just before it)
    with atomic_out_dir(out_dir, opts.overwrite) as tmp, (
            atomic_out_dir(hf_dir, opts.overwrite, "--export-hf") if hf_dir is not None else nullcontext()) as hf_tmp:
        spill = IntegerSpill(tmp / ".integers.spill")  # each layer's integers leave memory as it finishes
        try:
            head = _head_search(gm, opts)
            result = (rtn(gm, opts.scheme, progress, keep=spill.put) if opts.rtn_only else
                      awq_search(gm, per_layer, calib_ids, opts.search_options(), progress=progress, keep=spill.put,
                                 head=head, ranks=ranks, held=held_ids))
            if result.guard is not None and result.guard.alarming:  # never silently: said now, and in report.json
                warnings.append(result.guard.summary())
                warn(warnings[-1])
            quantized, table = dict(result.quantized), None
            if opts.quantize_lm_head:
                name = head[0].layers[0] if head else None
                if head is None:
                    name, quantized[name] = quantize_head(gm, opts.head_scheme)
                table = (token_table_of_head(name, quantized[name], result.folded)
                         if shares_head(gm, opts.head_scheme, opts.scheme) else quantize_token_table(gm, opts.scheme))
            lap("search")
            emitted = write_onnx(gm, quantized, tmp / "model.onnx", model=model, accuracy_level=opts.accuracy_level,
                                 act_dtype=opts.act_dtype, quantized_table=table, plan=plan)
            lap("emit")
            exported = None
            if hf_tmp is not None:
                exported = {"folder": str(hf_dir), **write_compressed_checkpoint(
                    hf_tmp, gm, model, result.quantized, opts.scheme, checkpoint_dtype(model, source), tokenizer,
                    progress)}
                lap("export_hf")
        finally:
            spill.close()
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        runtime_files = write_runtime_files(tmp, model, tokenizer)  # onnxruntime-genai's and optimum's
        (tmp / "awq_config.json").write_text(json.dumps(found.quark, indent=2) + "\n")
        report = _report(result, opts, emitted.quantized_linears, lap.timings, calib_ids, found.skipped)
        report["graph"] = {"kind": emitted.kind, "act_dtype": opts.act_dtype, "accuracy_level": opts.accuracy_level,
                           "lm_head_bits": opts.lm_head_bits if opts.quantize_lm_head else None,
                           "check_deviation": emitted.check_deviation,
                           "float_check_deviation": emitted.float_check_deviation,
                           "checked_layers": emitted.checked_layers, "integers_checked": emitted.integers_checked,
                           "runtime_files": runtime_files}
        report["calibration_source"] = calib_source
        report["ranks"] = _ranks_report(ranks, calib_ids, opts)
        report["weights"] = {"streamed": gm.streamed, "loaded_whole_because": whole_because}
        report["export"] = {"fixed_seq": gm.fixed_seq}
        report["export_hf"] = exported
        for message in emitted.warnings:
            warn(message)
        report["warnings"] = warnings + emitted.warnings
        report["onnx_bytes"] = sum(p.stat().st_size for p in tmp.glob("model.onnx*"))
        report["least_weight_bytes"] = {"int4": nibbles, "other": others}  # the free-space check's lower bound
        report["peak_rss_mb"] = _peak_rss_mb()
        report["device_peak_mb"] = _device_peak_mb(opts.device)  # the search's GPU memory; None on the CPU
        report["peak_rss_mb_after"] = lap.peak_rss_mb  # where the peak grows, stage by stage
        (tmp / "report.json").write_text(json.dumps(_finite(report), indent=2, allow_nan=False) + "\n")
    ranks.wait()  # the others return once OUT is in place
    files = sorted(p for p in out_dir.iterdir() if p.is_file())
    return CompileResult(out_dir, files, report)


def _least_bytes(gm, opts: CompileOptions) -> tuple[int, int]:
    """At least what compile writes of the weights, in bytes: (the quantized linears' int4 nibbles,
    every other parameter at 2 bytes, the token table and the head at half a byte when
    --quantize-lm-head). The scales, the zero points and the graph are left out: a lower bound
    whatever the activation type (float32 weights take twice) or the decoder emitted."""
    quantized = {gm.linears[n].weight for n in quantizable_linears(gm)}
    packed = set()  # at 4 bits or more
    if opts.quantize_lm_head:
        head = output_head(gm)
        packed = {token_table(gm)} | ({gm.linears[head].weight} if head else set())
    nibbles = others = 0
    read = {gm.param_of(n) for n in gm.graph.nodes if n.op == "placeholder" and n.users}  # a tied table once
    for name in read - {None}:
        numel = math.prod(gm.param_shape(name))
        if name in quantized:
            nibbles += numel // 2
        else:
            others += numel // 2 if name in packed else 2 * numel
    return nibbles, others


def _head_search(gm, opts: CompileOptions):
    """(the head's group, its scheme) when the head is searched: a 4-bit head with calibration
    is searched like a group of its own (scale into the final norm, clipping); an 8-bit one is
    rounded to nearest (8 bits leave the search nothing to gain, at minutes of search:
    docs/deploying.md)."""
    if not (opts.quantize_lm_head and opts.lm_head_bits == 4 and not opts.rtn_only):
        return None
    head = head_group(gm)
    return (head, opts.head_scheme) if head else None


def _same_model_on_every_rank(model, skeleton, opts: CompileOptions, ranks: Ranks) -> None:
    """Every rank compiles the same model with the same options (``awq_graph.fingerprint``),
    checked before any collective that depends on them: a rank that differs is named on every
    rank, with what differs."""
    if ranks.world == 1:
        return
    mine = {**model_fingerprint(model, skeleton.weights if skeleton else None, skeleton.aliases if skeleton else None),
            "options": options_fingerprint(opts)}
    every = ranks.gather(mine)
    for rank, theirs in enumerate(every):
        differs = [part for part in WHAT if theirs.get(part) != every[0].get(part)]
        if differs:
            raise RankFailed(f"rank {rank}: its model or options differ from rank 0's ({'; '.join(WHAT[p] for p in differs)}): "
                             "every rank must compile the same checkpoint with the same options")


def _same_on_every_rank(calib_ids, source: str, ranks: Ranks) -> None:
    """Every rank read the same calibration tokens (each reads its own copy of a file: on
    several machines they may differ), and there is a sample for each rank. Every rank sees a
    fault here, and raises the same line."""
    if ranks.world == 1:
        return
    if calib_ids.shape[0] < ranks.world:
        raise RankFailed(f"calibration from {source} gave {calib_ids.shape[0]} samples, fewer than the "
                         f"{ranks.world} ranks: give at least one sample per rank (--n-samples)")
    digests = ranks.gather(hashlib.sha256(calib_ids.numpy().tobytes()).hexdigest())
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RankFailed(f"rank {differ[0]}: calibration from {source} gave other tokens than rank 0's: every rank "
                         "must read the same calibration (the same file, or --calib self)")


def _ranks_report(ranks: Ranks, calib_ids, opts: CompileOptions) -> dict:
    """How many processes shared the calibration, and the samples each ran."""
    n = 0 if calib_ids is None else int(calib_ids.shape[0])
    shares = [len(range(r, n, ranks.world)) for r in range(ranks.world)]
    backend = None
    if ranks.group is not None:
        import torch.distributed as dist

        backend = str(dist.get_backend(ranks.group))
    return {"world": ranks.world, "backend": backend, "samples_per_rank": None if opts.rtn_only else shares,
            "bytes_summed": ranks.traffic["summed"], "bytes_gathered": ranks.traffic["gathered"],
            "bytes_broadcast": ranks.traffic["broadcast"]}


def resolve_device(asked: str) -> str:
    """"auto" -> "cuda" when torch sees a CUDA GPU, else "cpu"; "cuda" without one is an error
    (before anything is loaded)."""
    import torch

    asked = str(asked)
    if asked == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if asked == "cpu":
        return asked
    if asked == "cuda" or asked.startswith("cuda:"):
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "it sees no CUDA GPU"
            raise InputError(f"--device {asked}: {why} (torch {torch.__version__}); use --device cpu")
        index = int(asked.split(":", 1)[1]) if ":" in asked else 0
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {asked}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
        return asked
    raise InputError(f"--device {asked}: choose cpu, cuda, cuda:N or auto")


def _options(option_fields: dict) -> CompileOptions:
    known = {f.name for f in fields(CompileOptions)}
    unknown = sorted(set(option_fields) - known)
    if unknown:
        raise TypeError(f"compile() got unknown options {unknown}; CompileOptions has {sorted(known)}")
    return CompileOptions(**option_fields)


class _Laps:
    """Seconds per stage, in the order the stages ran; a stage's end is where a signal that a
    finalizer swallowed stops the run (``interrupt.checkpoint``)."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}  # the process's peak so far, at the end of each stage
        self._t = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(now - self._t, 3)
        self.peak_rss_mb[stage] = _peak_rss_mb()
        self._t = now
        checkpoint()


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _reset_device_peak(device: str) -> None:
    """Start ``_device_peak_mb``'s count afresh (a CUDA ``device``; nothing on the CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def _device_peak_mb(device: str) -> float | None:
    """The most memory torch's allocator held on a CUDA ``device`` since ``_reset_device_peak``
    (None for the CPU, whose peak is the process's RSS)."""
    if not device.startswith("cuda"):
        return None
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def _calibration(calib, model, tokenizer, opts: CompileOptions, progress, source: Path | None, streamed=False,
                 ranks: Ranks = ONE, gm=None, plan=None, out_dir: Path | None = None):
    """(token ids (n, seqlen), where they came from, notes for the warnings). Text sampled from a
    streamed model needs the whole model once: it is loaded for the sampling (in float32 where that
    fits, else in its stored dtype: ``sampler_dtype``) and dropped after it. Over several ranks,
    the text is sampled once, by rank 0, and sent to the others (the same set as one process with
    the same seed, and the sampling is not repeated per rank); a file is read by every rank."""
    def missing(what: str) -> InputError:
        where = tokenizer_files(source) if source else "no tokenizer was given (pass tokenizer=...)"
        return InputError(f"{what} needs a tokenizer, and {where}; round-to-nearest (--rtn) or token tensors need none")

    if calib is None or (isinstance(calib, str) and calib == "self"):
        if tokenizer is None:
            raise missing("calibration 'self'")
        ids, notes = None, []
        if opts.self_sampler == "int8" and gm is not None and can_sample(plan):
            import tempfile

            # beside OUT as a hidden .OUT.tmp-PID-* (a killed run's is removed by the next); elsewhere off rank 0
            scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-sampler-", dir=out_dir.parent)
                           if ranks.leader else tempfile.mkdtemp(prefix="awq-graph-sampler-"))
            bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (tokenizer.eos_token_id or 0)
            ids = sampled_ids(gm, model, plan, opts.scheme, bos, opts.n_samples + opts.held, opts.seqlen, opts.seed,
                              scratch, progress=progress, ranks=ranks)
            return ids, "self", notes
        if ranks.leader:
            dtype, note = sampler_dtype(source) if streamed else (None, None)
            notes += [note] if note else []
            sampler = load_float_model(source, dtype) if streamed else model
            ids = calibration.self_generated(sampler, tokenizer, opts.n_samples + opts.held, opts.seqlen, opts.seed,
                                             progress=progress)
            del sampler
        return ranks.leader_object(ids), "self", notes
    if isinstance(calib, (str, os.PathLike)):
        if tokenizer is None:
            raise missing(f"calibration from the text file {calib}")
        return calibration.from_file(calib, tokenizer, opts.n_samples + opts.held, opts.seqlen), str(calib), []
    return calibration.from_tensors(calib, opts.n_samples + opts.held, opts.seqlen), "tensors", []


def _held_aside(ids: torch.Tensor, opts: CompileOptions, source: str):
    """(the search's samples, the held-aside ones or None, a note or None): the samples past
    ``n_samples`` are held aside; where the source gave no more than ``n_samples``, the check is off
    rather than the search's calibration cut."""
    if opts.held == 0:
        return ids, None, None
    if ids.shape[0] <= opts.n_samples:
        return ids, None, (f"the held-aside check is off: calibration from {source} gave {ids.shape[0]} samples of "
                           f"{opts.seqlen} tokens, none beyond the {opts.n_samples} the search takes (n_samples; "
                           f"the check holds {opts.held} more aside: give more text, fewer samples, or held_samples=0)")
    return ids[:opts.n_samples], ids[opts.n_samples:], None


def _group_fit(gm, group_size: int) -> list[str]:
    """Refuse a group size wider than every quantized linear's input (each row would be one
    padded block: a file larger than the float one); warn when only some are narrower, and when
    inputs are not a multiple of it: MatMulNBits pads each row's last group (SmolLM2's 576-wide
    inputs at group 128: 4.5 groups written as 5), naming the group size that divides them all."""
    widths = {name: gm.linears[name].in_features for name in quantizable_linears(gm)}
    narrow = sorted(n for n, w in widths.items() if w < group_size)
    if narrow and len(narrow) == len(widths):
        widest = max(widths, key=widths.get)
        raise InputError(f"group size {group_size} (--group-size) is wider than every quantized layer's input "
                         f"(the widest, {widest}, has {widths[widest]}): choose at most {widths[widest]}")
    warnings = [f"{len(narrow)} linears have inputs narrower than the group size {group_size} (e.g. {narrow[0]}, "
                f"{widths[narrow[0]]}): each of their rows is one padded block"] if narrow else []
    ragged = sorted(n for n, w in widths.items() if w > group_size and w % group_size)
    if ragged:
        rows = {n: gm.linears[n].out_features * max(1, gm.linears[n].experts) for n in widths}
        padded = {n: n_groups(w, group_size) * group_size for n, w in widths.items()}
        written = sum(rows[n] * padded[n] for n in widths)
        padding = sum(rows[n] * (padded[n] - widths[n]) for n in widths)
        divides = next((g for g in (group_size >> k for k in range(1, 8))
                        if g >= 16 and all(w % g == 0 for w in widths.values())), None)
        warnings.append(f"{len(ragged)} linears' inputs are not a multiple of the group size {group_size} (e.g. "
                        f"{ragged[0]}, {widths[ragged[0]]}): MatMulNBits pads each row's last group, "
                        f"{padding / written:.1%} of the int4 integers written"
                        + (f"; --group-size {divides} divides every input" if divides else ""))
    return warnings


def _check_head_group(gm, opts: CompileOptions) -> None:
    """A quantized head's group may not be wider than its input: each row would be one padded
    block, a head larger than at the group that fits."""
    head = output_head(gm) if opts.quantize_lm_head else None
    if head is None:
        return
    width, group = gm.linears[head].in_features, opts.head_scheme.group_size
    if group > width:
        raise InputError(f"--lm-head-group-size {group} is wider than the head's input ({head}: {width}): choose at "
                         f"most {width} (each row would be one padded block)")


def _finite(value):
    """The report with every NaN or inf float as null (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _report(result: SearchResult, opts: CompileOptions, n_q: int, timings, calib_ids, skipped):
    return {
        "scheme": opts.scheme.name,
        "method": "rtn" if opts.rtn_only else ("awq+clip" if opts.clip else "awq"),
        "quantized_linears": n_q,
        "calibration": None if calib_ids is None else {"samples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1])},
        "timings_s": timings,
        "search_s": round(result.seconds, 3),
        "device": opts.device,
        "grid_screen": None if opts.rtn_only else (opts.search_options().linear_screen or "off"),
        "grid_points": None if opts.rtn_only else opts.grid_points,
        "groups": [
            {"layer": g.layer, "prev_op": g.prev_op, "layers": g.layers,
             "ratio": g.ratio, "loss_rtn": g.loss_rtn, "loss_awq": g.loss_awq, "loss_form": g.loss_form,
             "exact_points": g.exact_points, "screen": g.screen, "screen_deviation": g.screen_deviation,
             "grid_passes": g.grid_passes}
            for g in result.groups
        ],
        "clipping": [
            {"linear": c.linear, "clipped": c.clipped, "loss_before": c.loss_before,
             "loss_after": c.loss_after, "mean_shrink": c.mean_shrink}
            for c in result.clips
        ],
        "skipped_groups": [s.to_json() for s in skipped],
        "held_aside_check": None if result.guard is None else {**asdict(result.guard), "summary": result.guard.summary()},
    }
