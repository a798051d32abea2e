"""The pipeline driver: load -> export -> match -> search -> fold -> quantize -> emit.

``compile`` is the Python API; the CLI is a thin layer over it.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from awq_graph.passes.check_config import derive_groups, resolve_config
from awq_graph.core.records import read_quark_config, to_quark_config

from . import calib as calibration
from .emit import check_emittable, write_onnx
from .core.errors import ConfigError, InputError
from .export import export_model
from .load import load_model
from .core.numerics import QuantScheme, quantize
from .core.analysis import example_values, output_head
from .search import SearchOptions, SearchResult, awq_search, rtn
from .verify import verify_groups


@dataclass
class CompileResult:
    out_dir: Path
    files: list[Path]
    report: dict = field(default_factory=dict)


def _scheme(scheme) -> QuantScheme:
    return scheme if isinstance(scheme, QuantScheme) else QuantScheme.parse(str(scheme))


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise InputError(f"output folder {out_dir} already exists and is not empty (pass --overwrite to replace it)")
    if not out_dir.parent.exists():
        raise InputError(f"the parent folder of {out_dir} does not exist")


def compile(model, calib=None, out_dir="out", scheme="uint4_wo_128", config=None, *, tokenizer=None,
            n_samples: int = 128, seqlen: int = 512, clip: bool = True, rtn_only: bool = False,
            seed: int = 0, accuracy_level: int = 4, overwrite: bool = False, progress=None,
            quantize_lm_head: bool = False, lm_head_bits: int = 8, act_dtype: str = "float32", kv_cache: bool = True,
            search_options: dict | None = None) -> CompileResult:
    """Quantize a causal LM with AWQ and write an int4 MatMulNBits ONNX model to ``out_dir``.

    model: a ``PreTrainedModel`` (then pass ``tokenizer`` to have it saved) or a path to a
    checkpoint folder or .gguf file. calib: None or "self" (text sampled from the model), a
    .txt/.jsonl path, or token tensors (a tensor, a list, a dataloader). config: None (derive
    the scaling groups from the graph), a Quark AWQ config dict, or a path to one.
    quantize_lm_head: lm_head as MatMulNBits of ``lm_head_bits`` (8 by default: int4 costs SmolLM2
    ~3.5 perplexity) and, in the KV-cache decoder, the embedding table as int4 GatherBlockQuantized. act_dtype: "float32" or "float16" activations (KV-cache decoder).
    kv_cache: emit the fused KV-cache decoder where the model family has one (else logits-only).
    Nothing is written to ``out_dir`` until everything succeeded.
    """
    if act_dtype not in ("float32", "float16"):
        raise InputError(f"--act-dtype {act_dtype}: choose float32 or float16")
    qscheme = _scheme(scheme)
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir, overwrite)
    if isinstance(config, (str, os.PathLike)):
        config = read_quark_config(config)
    if isinstance(calib, (str, os.PathLike)) and str(calib) != "self" and not rtn_only and not Path(calib).is_file():
        raise InputError(f"calibration file {calib} does not exist (give a .txt or .jsonl file, or 'self')")
    timings: dict[str, float] = {}
    t = time.perf_counter()

    def lap(stage):
        nonlocal t
        now = time.perf_counter()
        timings[stage] = round(now - t, 3)
        t = now

    loaded_here = isinstance(model, (str, os.PathLike))
    if loaded_here:
        model, tokenizer = load_model(model)
    model.eval()
    lap("load")

    # before calibration: a model we cannot export or emit fails in seconds. The folds edit the
    # weights in place: a model we loaded ourselves shares them, a caller's gets copies.
    gm = export_model(model, private=not loaded_here)
    check_emittable(gm, model, kv_cache, qscheme.group_size)
    lap("export")

    calib_ids = None
    if not rtn_only:
        if calib is None or (isinstance(calib, str) and calib == "self"):
            if tokenizer is None:
                raise InputError("calibration 'self' needs the tokenizer (pass tokenizer=...)")
            calib_ids = calibration.self_generated(model, tokenizer, n_samples, seqlen, seed, progress=progress)
            calib_source = "self"
        elif isinstance(calib, (str, os.PathLike)):
            if tokenizer is None:
                raise InputError("a calibration text file needs the tokenizer (pass tokenizer=...)")
            calib_ids = calibration.from_file(calib, tokenizer, n_samples, seqlen)
            calib_source = str(calib)
        else:
            calib_ids = calibration.from_tensors(calib, n_samples, seqlen)
            calib_source = "tensors"
        lap("calibration")

    example = example_values(gm)
    warnings_: list[str] = []
    if config is None:
        prefix, per_layer, skipped = derive_groups(gm, example)
        quark = to_quark_config(per_layer[0] if per_layer else [], prefix, len(per_layer))
        if not any(per_layer):
            reasons = "; ".join(sorted({s.reason for s in skipped})[:3]) or "no linear reads a scalable tensor"
            warnings_.append(f"no scaling group found, compiling with plain RTN and clipping: {reasons}")
        elif (deviation := verify_groups(gm, per_layer)) > 1e-4:
            warnings_.append(f"derived groups failed verification (logit deviation {deviation:.1e} > 1e-4): "
                             "compiling with plain RTN and clipping; please report this architecture")
            per_layer = [[] for _ in per_layer]
    else:
        per_layer, faults = resolve_config(gm, config, example)
        if faults:
            raise ConfigError("config does not fit the model: " + "; ".join(faults))
        skipped = []
        quark = dict(config)
    lap("match")

    if rtn_only:
        result = rtn(gm, qscheme)
    else:
        opts = SearchOptions(scheme=qscheme, clip=clip, **(search_options or {}))
        result = awq_search(gm, per_layer, calib_ids, opts, progress=progress)
    if quantize_lm_head:
        head = output_head(gm)
        if head is None:
            raise InputError("--quantize-lm-head: no linear layer writes the logits in this graph")
        head_scheme = QuantScheme(lm_head_bits, qscheme.group_size, qscheme.symmetric)
        result.quantized[head] = quantize(gm.linears[head].matrix(gm.params).detach().float(), head_scheme)
    lap("search")

    parent = out_dir.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    try:
        emitted = write_onnx(gm, result.quantized, tmp / "model.onnx", model=model, accuracy_level=accuracy_level,
                             act_dtype=act_dtype, kv_cache=kv_cache,
                             quantize_embedding=qscheme if quantize_lm_head else None)
        warnings_ += emitted.warnings
        lap("emit")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "awq_config.json").write_text(json.dumps(quark, indent=2) + "\n")
        report = _report(result, qscheme, emitted.quantized_linears, timings, calib_ids, rtn_only, skipped, clip)
        report["graph"] = {"kind": emitted.kind, "act_dtype": act_dtype, "accuracy_level": accuracy_level,
                           "lm_head_bits": lm_head_bits if quantize_lm_head else None, "check_deviation": emitted.check_deviation,
                           "float_check_deviation": emitted.float_check_deviation}
        report["calibration_source"] = None if rtn_only else calib_source
        report["warnings"] = warnings_
        report["onnx_bytes"] = sum(p.stat().st_size for p in tmp.glob("model.onnx*"))
        report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        _default_permissions(tmp)
        if out_dir.exists():
            old = parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p for p in out_dir.iterdir() if p.is_file())
    return CompileResult(out_dir, files, report)


def _default_permissions(folder: Path) -> None:
    """What a plain mkdir/open would have given (mkdtemp and the ONNX writer make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _report(result: SearchResult, scheme: QuantScheme, n_q: int, timings, calib_ids, rtn_only, skipped, clip):
    return {
        "scheme": scheme.name,
        "method": "rtn" if rtn_only else ("awq+clip" if clip else "awq"),
        "quantized_linears": n_q,
        "calibration": None if calib_ids is None else {"samples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1])},
        "timings_s": timings,
        "search_s": round(result.seconds, 3),
        "groups": [
            {"layer": g.layer, "prev_op": g.prev_op, "layers": g.layers,
             "ratio": g.ratio, "loss_rtn": g.loss_rtn, "loss_awq": g.loss_awq}
            for g in result.groups
        ],
        "clipping": [
            {"linear": c.linear, "clipped": c.clipped, "loss_before": c.loss_before,
             "loss_after": c.loss_after, "mean_shrink": c.mean_shrink}
            for c in result.clips
        ],
        "skipped_groups": [{"prev_op": s.prev_op, "layers": list(s.layers), "reason": s.reason} for s in skipped],
    }
