"""``awq-graph``: compile, eval. ``main(argv) -> int``; errors are one line and exit 1."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import re
import signal
import sys
import warnings
from pathlib import Path

from .core.errors import AwqGraphError, first_line
from .interrupt import catch_signals, checkpoint, signal_behind, signals_held


def _progress(it, desc, total):
    """A progress bar on stderr; between items, a signal a finalizer swallowed is raised again."""
    from tqdm.auto import tqdm

    checkpoint()
    for item in tqdm(it, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True):
        checkpoint()
        yield item


# the flags that set the library's options where the flag is not the option's name with dashes
# (``CompileOptions``' fields, and the keyword arguments of ``compile`` and ``CompiledModel``)
_FLAGS = {"out_dir": "-o", "rtn_only": "--rtn", "grid_points": "--grid", "clip=False": "--no-clip",
          "stream=False": "--no-stream", "kv_cache=False": "--no-kv-cache", "kv_cache='generic'": "--generic-decoder"}


OPTION_NAMED = re.compile(r"(?<!`)`([a-z][a-z0-9_]*)(?:=([^`]*))?`(?!`)")  # not a docstring's ``code``


def respell(message: str) -> str:
    """A library message as the command line says it: each option it names as the Python API
    spells it, `name` or `name=value` in backquotes, becomes the flag that sets it
    (`seqlen=4096` -> --seqlen 4096, `overwrite=True` -> --overwrite, `stream=False` -> --no-stream)."""
    def flag(found: re.Match) -> str:
        name, value = found.group(1), found.group(2)
        if f"{name}={value}" in _FLAGS:
            return _FLAGS[f"{name}={value}"]
        spelled = _FLAGS.get(name, "--" + name.replace("_", "-"))
        return spelled if value in (None, "True") else f"{spelled} {value.strip(chr(39))}"
    return OPTION_NAMED.sub(flag, message)


def _quiet() -> None:
    """Third-party chatter off: warnings, transformers' and torch.onnx's logs."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torch", "torch.onnx", "torch.export", "transformers", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``awq-graph: error: argument --seqlen: ...``), exit status 2."""

    def error(self, message):
        self.exit(2, f"awq-graph: error: {message} (see {self.prog} --help)\n")


def _at_least(minimum, kind=int):
    """An argparse type: an ``kind`` (int, or float: finite) of at least ``minimum``."""
    noun = "an integer" if kind is int else "a finite number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {noun}, got '{text}'") from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"must be {noun} of at least {minimum:g}, got {text}")
        return value
    return parse


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="awq-graph", description="AWQ int4 compiler: HF causal LM -> MatMulNBits ONNX")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="quantize MODEL with AWQ and write an int4 ONNX model")
    c.add_argument("model", help="checkpoint folder or .gguf file")
    c.add_argument("-o", "--out", required=True, help="output folder (written atomically)")
    c.add_argument("--calib", default=None, help="text or jsonl file, or 'self' (default): text sampled from the model")
    c.add_argument("--self-sampler", default="int8", choices=["int8", "transformers"],
                   help="what --calib self samples its text with: int8 (default), the model's round-to-nearest 8-bit "
                        "decoder in onnxruntime, a batch of samples per step; transformers: generate() on the whole "
                        "float model")
    c.add_argument("--n-samples", type=_at_least(1), default=128, help="calibration sequences (default 128)")
    c.add_argument("--seqlen", type=_at_least(2), default=512, help="tokens per calibration sequence (default 512)")
    c.add_argument("--held-samples", type=_at_least(0), default=None,
                   help="calibration sequences beyond --n-samples held aside from the search: per layer and end to end "
                        "(next-token NLL) the searched model is checked against round-to-nearest on them and the "
                        "better written (default: 2048 tokens' worth, at most a quarter of --n-samples; 0: no check)")
    c.add_argument("--bits", type=int, default=4)
    c.add_argument("--group-size", type=int, default=128)
    sym = c.add_mutually_exclusive_group()
    sym.add_argument("--sym", action="store_true", help="symmetric int4 (zero point 8)")
    sym.add_argument("--asym", action="store_true", help="asymmetric uint4 with zero points (default)")
    c.add_argument("--no-clip", action="store_true", help="skip the weight clipping search")
    c.add_argument("--rtn", action="store_true", help="round-to-nearest baseline: no search, no calibration")
    c.add_argument("--rounding", default="nearest", choices=["nearest", "gptq"],
                   help="how each linear's integers are chosen on the grid AWQ's scales and clipping made: to nearest "
                        "(AWQ's), or gptq: column by column, each column's error carried onto the rest through the "
                        "calibration input's inverse Hessian (same scales, zero points and layout; slower)")
    c.add_argument("--config", help="a Quark-format AWQ config to use instead of the derived one")
    c.add_argument("--seed", type=_at_least(0), default=0)
    c.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits accuracy_level (4: int8 activations on CPU)")
    c.add_argument("--loss-tokens", type=_at_least(1), default=None, help="tokens of the loss subsample (whole sequences)")
    c.add_argument("--device", default="auto",
                   help="where the search runs: cpu, cuda, cuda:N or auto (default: a CUDA GPU if torch sees one)")
    c.add_argument("--grid-screen", default="auto", choices=["auto", "bfloat16", "sketch", "off"],
                   help="estimate the scale grid's losses cheaply, then decide on float32 losses of the best "
                        "points: bfloat16 products, or a single linear's loss from a random sketch of an eighth of "
                        "its rows (auto: bfloat16 where its products are fast, AVX512-BF16/AMX CPUs and CUDA, else "
                        "the sketch; off: float32 for every point)")
    c.add_argument("--grid", type=_at_least(1), default=20, metavar="N",
                   help="ratios of the scale grid besides the identity (default 20, AWQ's; fewer search faster)")
    c.add_argument("--export-hf", metavar="DIR", default=None,
                   help="also write the AWQ-scaled model to DIR as a compressed-tensors pack-quantized checkpoint "
                        "(the same integers; transformers with compressed-tensors and vLLM load it)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--quantize-lm-head", action=argparse.BooleanOptionalAction, default=None,
                   help="lm_head as MatMulNBits and the token table as GatherBlockQuantized (default: on wherever "
                        "a linear writes the logits; --no-quantize-lm-head keeps both in float32)")
    c.add_argument("--lm-head-bits", type=int, default=None, choices=[4, 8],
                   help="bits of the quantized lm_head (default 8, rounded to nearest; 4 is searched like a scaling "
                        "group with calibration, and shares its integers with a tied embedding table)")
    c.add_argument("--lm-head-group-size", type=int, default=None,
                   help="group size of the quantized lm_head (default: the scheme's; 32 costs SmolLM2's 4-bit head "
                        "least perplexity)")
    c.add_argument("--table-bits", type=int, default=None, choices=[4, 8],
                   help="bits of the quantized token table (GatherBlockQuantized; default: the head's)")
    c.add_argument("--act-dtype", default="float32", choices=["float32", "float16"],
                   help="activation type of the ONNX model (float16 for the CUDA provider)")
    decoder = c.add_mutually_exclusive_group()
    decoder.add_argument("--no-kv-cache", action="store_true",
                   help="emit the logits-only graph (torch.onnx) even where the fused KV-cache decoder fits")
    decoder.add_argument("--generic-decoder", action="store_true",
                   help="emit the generic KV-cache decoder (torch.onnx of the model with its cache) even where "
                        "the fused one fits, e.g. to compare them")
    c.add_argument("--no-stream", action="store_true",
                   help="load the whole model in float32 first, instead of reading one tensor at a time")

    e = sub.add_parser("eval", help="perplexity of a compiled folder (onnxruntime) or of MODEL (torch, float)")
    e.add_argument("model", help="compiled folder, checkpoint folder or .gguf file")
    e.add_argument("--text", required=True, help="text file to score")
    e.add_argument("--seqlen", type=_at_least(2), default=None,
                   help="tokens per scored window (default 2048, or the model's context if shorter)")
    e.add_argument("--max-windows", type=_at_least(1), default=None)
    e.add_argument("--threads", type=_at_least(1), default=None)
    e.add_argument("--json", action="store_true", help='print {"ppl": ..., "tokens": ...} on one line')
    e.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "stored"],
                   help="MODEL's weights in torch: float32, its stored dtype, or auto (float32 when it fits "
                        "in the memory available, else the stored dtype)")

    g = sub.add_parser("generate", help="stream a continuation of PROMPT from a compiled folder (onnxruntime)")
    g.add_argument("model", help="compiled folder")
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--max-new-tokens", type=_at_least(1), default=64)
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    mode.add_argument("--temperature", type=_at_least(0.0, float), default=0.0, help="sample at this temperature (> 0)")
    g.add_argument("--top-k", type=_at_least(0), default=0, help="sample among the k likeliest tokens (0: all)")
    g.add_argument("--seed", type=_at_least(0), default=0)
    g.add_argument("--threads", type=_at_least(1), default=None)
    g.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    g.add_argument("--spin", action="store_true",
                   help="let onnxruntime's threads busy-wait between ops: faster decode, a busy CPU")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")

    i = sub.add_parser("infer-config", help="print the scaling groups derived from the graph (Quark format)")
    i.add_argument("model", help="checkpoint folder, .gguf file, or a transformers model type (tiny random model)")
    i.add_argument("--json", action="store_true", help="the Quark-format config as JSON")

    k = sub.add_parser("check-config", help="check a Quark-format AWQ config against the graph")
    k.add_argument("model", help="checkpoint folder, .gguf file, or a transformers model type (tiny random model)")
    k.add_argument("config", help="the config JSON, or - for the derived one")
    k.add_argument("--verify", action="store_true",
                   help="fold random scales (1/8..8) along every group, quantization off, and compare logits")
    return p


def _graph_of(spec: str):
    """MODEL as a path, or a transformers model type -> (GraphModel, label)."""
    from .export import export_model
    from .load import load_model, tiny_random_model

    if Path(spec).exists() or "/" in spec or spec.endswith(".gguf"):
        model, _ = load_model(spec)
        return export_model(model), spec
    return export_model(tiny_random_model(spec)), f"tiny random {spec}"


def _infer(args) -> int:
    from .match import match

    gm, label = _graph_of(args.model)
    found = match(gm)
    config, prefix, per_layer = found.quark, found.prefix, found.per_layer
    if args.json:
        print(json.dumps(config, indent=2))
        return 0
    base = f"{prefix}.0."
    print(f"{label}: {len(per_layer)} decoder layers under '{prefix}', {len(config['scaling_layers'])} groups per layer")
    rows = [("prev_op", "layers", "channel map", "module2inspect")]
    for g in per_layer[0] if per_layer else []:
        rows.append((g.prev_op.removeprefix(base), ", ".join(x.removeprefix(base) for x in g.layers),
                     "; ".join(sorted(set(g.kinds()))), g.module2inspect.removeprefix(base)))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    for s in found.skipped:
        layers = ", ".join(x.removeprefix(base) for x in s.layers)
        if s.prev_op.startswith(base):
            print(f"no group at {s.prev_op.removeprefix(base)} -> {layers}: {s.reason}")
        elif not s.prev_op and all(x.startswith(base) for x in s.layers):
            print(f"no source for {layers}: {s.reason}")
    return 0


def _check(args) -> int:
    from .core.records import read_quark_config
    from .match import VERIFY_TOLERANCE, match

    gm, label = _graph_of(args.model)
    found = match(gm, None if args.config == "-" else read_quark_config(args.config), verify=args.verify)
    for fault in found.faults:
        print(fault)
    if found.faults:
        print(f"{len(found.faults)} fault(s) in {args.config} for {label}")
        return 1
    print(f"{args.config if args.config != '-' else 'derived config'}: {found.n_groups} groups fit {label}")
    if args.verify:
        check = found.verification
        ok = check.deviation <= VERIFY_TOLERANCE
        print(f"verify: largest relative logit deviation {check.deviation:.2e} after folding random scales "
              f"along {found.n_groups} groups, {check.changed_params} parameters changed "
              f"({'ok' if ok else f'ABOVE {VERIFY_TOLERANCE:.0e}'})")
        return 0 if ok else 1
    return 0


# what each command imports (torch, transformers, onnxruntime below them), imported while signals are held
_HEAVY_MODULES = {"compile": (".pipeline",), "eval": (".runtime", ".load", ".float_eval", ".export"), "generate": (".runtime",),
                  "infer-config": (".export", ".load", ".match"), "check-config": (".export", ".load", ".match")}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for flag in ("lm_head_bits", "lm_head_group_size", "table_bits"):
        if getattr(args, flag, None) is not None and args.quantize_lm_head is False:
            parser.error(f"argument --{flag.replace('_', '-')}: applies only without --no-quantize-lm-head "
                         f"(the head and the table stay float with it)")
    if args.command == "compile":
        if args.rtn and args.calib is not None:
            parser.error("argument --calib: applies only without --rtn (round-to-nearest reads no calibration)")
        args.calib = args.calib or "self"
    _quiet()
    try:
        with signals_held():  # torch, transformers and onnxruntime import whole before a signal ends the run
            for module in _HEAVY_MODULES[args.command]:
                importlib.import_module(module, __package__)
        if args.command == "compile":
            return _compile(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "infer-config":
            return _infer(args)
        if args.command == "check-config":
            return _check(args)
    except AwqGraphError as exc:
        if args.debug:
            raise
        print(f"awq-graph: error: {respell(_rank_said(exc))}", file=sys.stderr)
        _exit_if_joining(1)
        if _RANK[0] is not None and _group_alive():
            # a torchrun rank whose process group is still up (a fault every rank saw at once):
            # tearing it down at exit, with the other ranks' connections closing too, can abort
            # the process (SIGABRT, seen in CI); the line is out and OUT was never placed
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(1)
        return 1
    except KeyboardInterrupt as stop:
        return _interrupted(getattr(stop, "signum", signal.SIGINT))
    except Exception as exc:  # a signal Python wrapped in another exception (torch importing) is still the signal
        signum = signal_behind(exc)
        if signum is None:
            raise
        return _interrupted(signum)
    return 0


def _group_alive() -> bool:
    import torch.distributed as dist

    return dist.is_initialized()


def _interrupted(signum: int) -> int:
    print(f"awq-graph: interrupted ({signal.Signals(signum).name}); nothing was written", file=sys.stderr)
    _exit_if_joining(128 + signum)
    return 128 + signum


def _exit_if_joining(code: int) -> None:
    """A rank stopped while its rendezvous thread still waits in C++ (for peers that never came)
    exits now: the interpreter's shutdown would wait on the store it holds."""
    if _PENDING[0] is not None:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)


COLLECTIVE_TIMEOUT_S = 2 * 3600  # the longest a collective inside the search may wait (torch.distributed's own)


def _torchrun_ranks():
    """The ranks of a ``torchrun`` launch (its environment: WORLD_SIZE > 1, RANK, MASTER_ADDR,
    MASTER_PORT): a process group over them (gloo, or nccl when the search runs on CUDA, each rank
    on GPU LOCAL_RANK) and the rendezvous store. None for one process. The rendezvous runs in a
    thread, so that SIGTERM and Ctrl-C end a rank whose peers never come, and it gives up after
    ``rank_timeout_s`` (AWQ_GRAPH_RANK_TIMEOUT) with one line."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) < 1:
        raise AwqGraphError(f"WORLD_SIZE={world} is not a number of processes: launch with torchrun, or unset it")
    if int(world) == 1:
        return None
    unset = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if unset:
        raise AwqGraphError(f"WORLD_SIZE={world} asks for a distributed compile, and {', '.join(unset)} "
                            f"{'is' if len(unset) == 1 else 'are'} not set: launch it with torchrun "
                            f"(torchrun --nproc-per-node {world} -m awq_graph.cli compile ...), or unset WORLD_SIZE")
    import threading
    import time
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from .core.ranks import Ranks, rank_timeout_s

    timeout = rank_timeout_s()
    joined: dict = {}

    def join():
        try:
            store, rank, size = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout)))
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=size,
                                    timeout=timedelta(seconds=max(COLLECTIVE_TIMEOUT_S, timeout)))
            joined["store"] = store
        except Exception as exc:
            joined["error"] = exc

    _PENDING[0] = thread = threading.Thread(target=join, name="awq-graph-rendezvous", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout + 30  # the rendezvous's own timeout, and the group's set-up
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(0.1)  # a signal's exception is raised here, between the waits
    if thread.is_alive() or "error" in joined:
        why = first_line(joined["error"], 200) if "error" in joined else "no answer"
        raise AwqGraphError(f"rank {os.environ['RANK']}: the {world} ranks did not all join at "
                            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout:.0f} s ({why}): "
                            "start every rank (torchrun), or set AWQ_GRAPH_RANK_TIMEOUT (seconds)")
    _PENDING[0] = None
    return Ranks(dist.group.WORLD, joined["store"])


_PENDING = [None]  # the rendezvous thread while it waits: a run ended then exits at once (it blocks in C++)
_RANK = [None]  # this process's rank in a torchrun launch, for its error lines


def _rank_said(exc) -> str:
    """An error line of a rank: "rank N: ..." (another rank's failure says its own rank already)."""
    from .core.ranks import RankFailed

    if _RANK[0] is None or isinstance(exc, RankFailed):
        return str(exc)
    return f"rank {_RANK[0]}: {exc}"


def _compile(args) -> int:
    ranks = _torchrun_ranks()
    if ranks is None:
        return _compile_on(args, None)
    _RANK[0] = ranks.rank
    code = _compile_on(args, ranks)
    # only after success: on an error the others may have closed their connections already, and
    # tearing the group down then can abort the process (SIGABRT) before its error line is printed
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return code


def _compile_on(args, ranks) -> int:
    from .pipeline import compile as run_compile

    leader = ranks is None or ranks.leader
    try:
        options = _compile_options(args, ranks)
    except BaseException as exc:  # the other ranks stop at their first collective, with this error
        if ranks is not None:
            from .core.errors import error_line

            ranks.fail(error_line(exc))
        raise
    result = run_compile(args.model, args.calib, args.out, options, progress=_progress if leader else None,
                         warn=lambda message: print(f"awq-graph: warning: {respell(message)}", file=sys.stderr), ranks=ranks)
    if not leader:  # rank 0 says what it wrote
        return 0
    rep = result.report
    groups = rep["groups"]
    better = sum(1 for g in groups if g["ratio"] is not None)
    print(f"wrote {result.out_dir} ({rep['scheme']}, {rep['method']}): {rep['quantized_linears']} MatMulNBits, "
          f"{len(groups)} scaling groups ({better} scaled), {rep['onnx_bytes'] / 2**20:.1f} MiB, "
          f"timings {rep['timings_s']}")
    check = rep.get("held_aside_check")
    if check and check["written"] == "searched":
        print(f"awq-graph: {respell(check['summary'])}", file=sys.stderr)  # otherwise it was a warning already
    if rep.get("export_hf"):
        hf = rep["export_hf"]
        print(f"wrote {hf['folder']} (compressed-tensors {hf['format']}: {hf['quantized_linears']} linears, "
              f"{hf['dtype']})")
    return 0


def _compile_options(args, ranks):
    from .core.numerics import QuantScheme
    from .pipeline import CompileOptions

    return CompileOptions(
        scheme=QuantScheme(bits=args.bits, group_size=args.group_size, symmetric=args.sym), config=args.config,
        n_samples=args.n_samples, seqlen=args.seqlen, clip=not args.no_clip, rtn_only=args.rtn, seed=args.seed,
        accuracy_level=args.accuracy_level, overwrite=args.overwrite, quantize_lm_head=args.quantize_lm_head,
        lm_head_bits=args.lm_head_bits or 8, lm_head_group_size=args.lm_head_group_size, table_bits=args.table_bits,
        act_dtype=args.act_dtype,
        kv_cache=False if args.no_kv_cache else "generic" if args.generic_decoder else True,
        loss_tokens=args.loss_tokens, device=_rank_device(args.device, ranks), stream=not args.no_stream,
        grid_screen=args.grid_screen, grid_points=args.grid, export_hf=args.export_hf, held_samples=args.held_samples,
        self_sampler=args.self_sampler, rounding=args.rounding)


def _rank_device(asked: str, ranks) -> str:
    """--device for a rank: "auto" and "cuda" are its own GPU (LOCAL_RANK's, set by ``_torchrun_ranks``)."""
    if ranks is None or asked not in ("auto", "cuda"):
        return asked
    import torch

    if asked == "auto" and not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else asked


def _eval(args) -> int:
    import torch

    from . import runtime
    from .calib import read_text

    target = Path(args.model)
    text = read_text(args.text, "--text file")
    if args.threads:
        torch.set_num_threads(args.threads)
    if _compiled_folder(target):
        compiled = runtime.CompiledModel(target, threads=args.threads, provider=args.provider)
        ids, seqlen = _scored_ids(args, compiled.tokenizer, text, compiled.max_positions)
        ppl, tokens = runtime.perplexity(compiled.logits, ids, seqlen, args.max_windows,
                                         progress=None if args.json else _progress)
    else:
        ppl, tokens = _eval_checkpoint(args, target, text)
    if args.json:
        print(json.dumps({"ppl": ppl, "tokens": tokens}))
    else:
        print(f"perplexity {ppl:.4f} over {tokens} tokens")
    return 0


def _scored_ids(args, tokenizer, text: str, context: int | None) -> tuple[list[int], int]:
    """The text's token ids and the window length: --seqlen, or 2048 (the context when shorter)."""
    from .core.errors import InputError

    seqlen = args.seqlen or min(2048, context or 2048)
    if context and seqlen > context:
        raise InputError(f"--seqlen {seqlen} is longer than the model's context of {context} positions")
    return tokenizer(text, add_special_tokens=False).input_ids, seqlen


def _eval_checkpoint(args, target: Path, text: str) -> tuple[float, int]:
    """The float model's perplexity in torch: a decoder layer at a time in float32 (``float_eval``),
    or the whole model where the checkpoint cannot be streamed or --dtype stored asks for its dtype."""
    from . import runtime
    from .core.errors import InputError
    from .float_eval import streamed_perplexity, streamed_program, windows_of
    from .load import eval_dtype, load_float_model, load_tokenizer, tokenizer_files

    tokenizer = load_tokenizer(target)
    if tokenizer is None:
        raise InputError(f"eval needs a tokenizer, and {tokenizer_files(target)}")
    progress = None if args.json else _progress
    if args.dtype != "stored":
        config_context = _context_of(target)
        ids, seqlen = _scored_ids(args, tokenizer, text, config_context)
        gm, why = streamed_program(target, seqlen)
        if gm is not None:
            return streamed_perplexity(gm, windows_of(ids, seqlen, args.max_windows), progress)
        print(f"awq-graph: eval: {target.name} is loaded whole ({respell(why)})", file=sys.stderr)
    dtype, note = eval_dtype(target, args.dtype)
    if note:
        print(f"awq-graph: {respell(note)}", file=sys.stderr)
    model = load_float_model(target, dtype)
    ids, seqlen = _scored_ids(args, tokenizer, text, getattr(model.config, "max_position_embeddings", None))
    return runtime.perplexity(runtime.torch_logits(model), ids, seqlen, args.max_windows, progress=progress)


def _context_of(target: Path) -> int | None:
    """The checkpoint's context (max_position_embeddings), from its config alone."""
    from transformers import AutoConfig

    from .load import checkpoint_location

    folder, kwargs = checkpoint_location(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.from_pretrained(folder, local_files_only=True, **kwargs)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def _compiled_folder(path: Path) -> bool:
    """A folder compile wrote (model.onnx). One with compile's report.json but no model.onnx is
    a compiled folder that lost its model (a partial copy), not a checkpoint: said so."""
    from .core.errors import InputError

    if path.is_dir() and not (path / "model.onnx").is_file() and (path / "report.json").is_file():
        raise InputError(f"{path} is a compiled awq-graph folder (report.json) without its model.onnx")
    return path.is_dir() and (path / "model.onnx").is_file()


def _generate(args) -> int:
    from .core.errors import InputError
    from .runtime import CompiledModel

    folder = Path(args.model)
    if not _compiled_folder(folder):
        raise InputError(f"{folder} is not a compiled awq-graph folder (no model.onnx)")
    model = CompiledModel(folder, threads=args.threads, provider=args.provider, spinning=args.spin)
    prompt = args.prompt
    if args.chat:
        if not getattr(model.tokenizer, "chat_template", None):
            raise InputError(f"--chat: the tokenizer in {folder} has no chat template (tokenizer_config.json's "
                             "chat_template): give the prompt as plain text, without --chat")
        prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True)
    prompt_ids = model.encode(prompt)
    new_tokens = args.max_new_tokens
    if model.max_positions and len(prompt_ids) + new_tokens > model.max_positions:
        new_tokens = model.max_positions - len(prompt_ids)
        if new_tokens < 1:
            raise InputError(f"the prompt has {len(prompt_ids)} tokens: the model's context of "
                             f"{model.max_positions} positions leaves none to generate")
        print(f"awq-graph: note: generating {new_tokens} tokens, not {args.max_new_tokens}: the prompt has "
              f"{len(prompt_ids)} and the model's context is {model.max_positions} positions", file=sys.stderr)
    if not args.chat:
        print(prompt, end="", flush=True)
    result = model.generate(prompt_ids, new_tokens, temperature=args.temperature, top_k=args.top_k,
                            seed=args.seed, on_text=lambda piece: print(piece, end="", flush=True))
    print()
    cache = "KV cache" if model.has_kv_cache else "no KV cache: each token re-runs the prefix"
    print(f"prefill {result.prompt_tokens} tokens in {result.prefill_s:.3f} s ({result.prefill_tokens_per_s:.1f} tok/s); "
          f"decode {len(result.steps)} tokens at {result.decode_tokens_per_s:.1f} tok/s ({cache})", file=sys.stderr)
    return 0


def entry() -> None:
    """The console script: SIGTERM and SIGHUP end a run as Ctrl-C does (OUT as it was before)."""
    catch_signals()
    sys.exit(main())
if __name__ == "__main__":
    entry()
