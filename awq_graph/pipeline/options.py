"""compile's options, checked when built, and its result."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..core.analysis import output_head
from ..core.errors import InputError, SchemeError
from ..core.numerics import QuantScheme
from ..core.records import read_quark_config
from ..search import ROUNDINGS, SCREENS, SearchOptions


ACCURACY_LEVELS = (0, 1, 2, 3, 4)


# the held-aside check's tokens by default (``CompileOptions.held``): a few thousand tokens put the
# standard error of a per-token NLL difference under the differences it has to decide
HELD_TOKENS = 2048


MAX_GRID_POINTS = 200  # the scale grid's ratios: beyond AWQ's 20 the losses barely move while the grid time grows


@dataclass(frozen=True)
class CompileOptions:
    """Everything ``compile`` can be asked, checked when built.

    scheme: a QuantScheme or its name (``uint4_wo_128``). config: None (derive the scaling
    groups from the graph), a Quark AWQ config dict, or a path to one. quantize_lm_head (None, the
    default: wherever the graph has a head; False: the head and the table in float32): lm_head
    as MatMulNBits of ``lm_head_bits`` (8 by default, rounded to nearest; 4 bits are searched with
    calibration, at ``lm_head_group_size``) and, in the KV-cache decoder, the token table as
    GatherBlockQuantized of ``table_bits`` (4 or 8; a tied head of as many bits: its integers themselves). act_dtype: "float32" or
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
    quantize_lm_head: bool | None = None  # None: wherever a linear writes the logits (``with_head_resolved``)
    lm_head_bits: int = 8
    lm_head_group_size: int | None = None  # None: the scheme's
    table_bits: int | None = None  # the quantized token table's bits (GatherBlockQuantized); None: the head's
    act_dtype: str = "float32"
    kv_cache: bool | str = True
    loss_tokens: int | None = None
    device: str = "auto"
    stream: bool = True
    grid_screen: str = "auto"
    grid_points: int = 20
    export_hf: str | os.PathLike | None = None
    held_samples: int | None = None  # None: HELD_TOKENS' worth of samples; 0: no held-aside check
    self_sampler: str = "int8"  # what calib="self" samples with: "int8" (awq_graph.sampling) or "transformers"
    rounding: str = "nearest"  # each linear's integers on the searched grid: "nearest", or "gptq" (error-compensating)

    def __post_init__(self):
        object.__setattr__(self, "device", resolve_device(self.device))
        if not isinstance(self.scheme, QuantScheme):
            object.__setattr__(self, "scheme", QuantScheme.parse(str(self.scheme)))
        if isinstance(self.config, (str, os.PathLike)):
            object.__setattr__(self, "config", read_quark_config(self.config))
        if self.act_dtype not in ("float32", "float16"):
            raise InputError(f"`act_dtype={self.act_dtype}`: choose float32 or float16")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise InputError(f"`accuracy_level={self.accuracy_level}`: choose one of {list(ACCURACY_LEVELS)}")
        if self.lm_head_bits not in (4, 8):
            raise InputError(f"`lm_head_bits={self.lm_head_bits}`: choose 4 or 8")
        if self.table_bits not in (None, 4, 8):
            raise InputError(f"`table_bits={self.table_bits}`: choose 4 or 8")
        if self.lm_head_group_size is not None:
            try:
                QuantScheme(self.lm_head_bits, self.lm_head_group_size)
            except SchemeError as exc:
                raise InputError(f"`lm_head_group_size={self.lm_head_group_size}`: {exc}") from None
        if self.n_samples < 1:
            raise InputError(f"`n_samples={self.n_samples}`: give at least 1 calibration sample")
        if self.seqlen < 2:
            raise InputError(f"`seqlen={self.seqlen}`: a calibration sample needs at least 2 tokens")
        if self.loss_tokens is not None and self.loss_tokens < 1:
            raise InputError(f"`loss_tokens={self.loss_tokens}`: give at least 1")
        if not 1 <= self.grid_points <= MAX_GRID_POINTS:
            raise InputError(f"`grid_points={self.grid_points}`: give 1 to {MAX_GRID_POINTS} ratios (the search's grid time "
                             f"grows with them: AWQ's 20 is the default, {MAX_GRID_POINTS} takes about 10 times as long)")
        if self.held_samples is not None and self.held_samples < 0:
            raise InputError(f"`held_samples={self.held_samples}`: give 0 (no held-aside check) or more")
        if self.grid_screen not in SCREENS:
            raise InputError(f"`grid_screen={self.grid_screen}`: choose one of {', '.join(SCREENS)}")
        if self.self_sampler not in ("int8", "transformers"):
            raise InputError(f"`self_sampler={self.self_sampler}`: choose int8 or transformers")
        if self.rounding not in ROUNDINGS:
            raise InputError(f"`rounding={self.rounding}`: choose one of {', '.join(ROUNDINGS)}")
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

    def with_head_resolved(self, gm) -> "CompileOptions":
        """``quantize_lm_head=None`` (the default) made True where ``gm`` has a linear writing the
        logits, else False: for today's vocabularies the float32 head and table are most of the
        file and of each step's reads, and at 8 bits they cost about a third of a percent of
        perplexity (docs/default-path.md); asked for explicitly, a graph without a head is refused.
        Not asked for, the head's group is the scheme's narrowed to the head's input (a power of
        two), so a small model's default is never a padded block per row."""
        if self.quantize_lm_head is not None:
            return self
        head = output_head(gm)
        if head is None:
            return replace(self, quantize_lm_head=False)
        width, group = gm.linears[head].in_features, self.lm_head_group_size
        if group is None and self.scheme.group_size > width:
            group = max(16, 1 << (width.bit_length() - 1))
        return replace(self, quantize_lm_head=True, lm_head_group_size=group)

    @property
    def table_scheme(self) -> QuantScheme:
        """The token table's: ``table_bits`` (default: the head's), in the layers' groups or the
        head's where narrower (its rows are as wide as the head's input)."""
        group = min(self.scheme.group_size, self.head_scheme.group_size)
        return QuantScheme(self.table_bits or self.lm_head_bits, group, self.scheme.symmetric)

    def search_options(self) -> SearchOptions:
        extra = {"loss_tokens": self.loss_tokens} if self.loss_tokens else {}
        return SearchOptions(scheme=self.scheme, n_grid=self.grid_points, clip=self.clip, device=self.device,
                             screen=self.grid_screen, rounding=self.rounding, **extra)


@dataclass
class CompileResult:
    out_dir: Path
    files: list[Path]  # empty on a rank other than 0: rank 0 alone writes OUT
    report: dict = field(default_factory=dict)


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
            raise InputError(f"`device={asked}`: {why} (torch {torch.__version__}); use `device=cpu`")
        index = int(asked.split(":", 1)[1]) if ":" in asked else 0
        if index >= torch.cuda.device_count():
            raise InputError(f"`device={asked}`: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
        return asked
    raise InputError(f"`device={asked}`: choose cpu, cuda, cuda:N or auto")


def options_from(option_fields: dict) -> CompileOptions:
    known = {f.name for f in fields(CompileOptions)}
    unknown = sorted(set(option_fields) - known)
    if unknown:
        raise TypeError(f"compile() got unknown options {unknown}; CompileOptions has {sorted(known)}")
    return CompileOptions(**option_fields)
