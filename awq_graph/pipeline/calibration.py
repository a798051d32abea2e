"""The calibration token ids: from a file, the caller's tensors, or sampled from the model; the held-aside samples past them."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .. import calib as calibration
from ..core.errors import InputError
from ..core.ranks import ONE, Ranks
from ..interrupt import signals_held
from ..load import load_float_model, sampler_dtype, tokenizer_files
from ..sampling import can_sample, sampled_ids
from .options import CompileOptions

if TYPE_CHECKING:
    import torch


def calibration_ids(calib, model, tokenizer, opts: CompileOptions, progress, source: Path | None, streamed=False,
                 ranks: Ranks = ONE, gm=None, plan=None, out_dir: Path | None = None):
    """(token ids (n, seqlen), where they came from, notes for the warnings). Text sampled from a
    streamed model needs the whole model once: it is loaded for the sampling (in float32 where that
    fits, else in its stored dtype: ``sampler_dtype``) and dropped after it. Over several ranks,
    the text is sampled once, by rank 0, and sent to the others (the same set as one process with
    the same seed, and the sampling is not repeated per rank); a file is read by every rank."""
    def missing(what: str) -> InputError:
        where = tokenizer_files(source) if source else "no tokenizer was given (pass tokenizer=...)"
        return InputError(f"{what} needs a tokenizer, and {where}; round-to-nearest (`rtn_only=True`) or token tensors need none")

    if calib is None or (isinstance(calib, str) and calib == "self"):
        if tokenizer is None:
            raise missing("calibration 'self'")
        ids, notes = None, []
        if opts.self_sampler == "int8" and gm is not None and can_sample(plan):
            bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (tokenizer.eos_token_id or 0)
            with sampler_scratch(out_dir, ranks.leader) as scratch:
                ids = sampled_ids(gm, model, plan, opts.scheme, bos, opts.n_samples + opts.held, opts.seqlen,
                                  opts.seed, scratch, progress=progress, ranks=ranks)
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


@contextlib.contextmanager
def sampler_scratch(out_dir: Path, leader: bool):
    """The folder the sampler's model is written into: beside OUT as a hidden .OUT.tmp-PID-* on
    rank 0 (a killed run's is removed by the next compile), elsewhere a temporary folder. Made
    with signals held and removed on any exit, so a signal the moment it appears leaves nothing."""
    scratch = None
    try:
        with signals_held():  # a signal here is raised when the block ends: scratch is set by then
            scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-sampler-", dir=out_dir.parent)
                           if leader else tempfile.mkdtemp(prefix="awq-graph-sampler-"))
        yield scratch
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def held_aside(ids: torch.Tensor, opts: CompileOptions, source: str):
    """(the search's samples, the held-aside ones or None, a note or None): the samples past
    ``n_samples`` are held aside; where the source gave no more than ``n_samples``, the check is off
    rather than the search's calibration cut."""
    if opts.held == 0:
        return ids, None, None
    if ids.shape[0] <= opts.n_samples:
        return ids, None, (f"the held-aside check is off: calibration from {source} gave {ids.shape[0]} samples of "
                           f"{opts.seqlen} tokens, none beyond the {opts.n_samples} the search takes (`n_samples`; "
                           f"the check holds {opts.held} more aside: give more text, fewer samples, or `held_samples=0`)")
    return ids[:opts.n_samples], ids[opts.n_samples:], None
