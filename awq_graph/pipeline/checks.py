"""What compile checks of the graph, the options and the ranks before the long work: the group sizes the graph takes, the disk space OUT needs, the ranks' agreement."""
from __future__ import annotations

import hashlib
import math

from ..core.analysis import output_head, quantizable_linears, token_table
from ..core.ranks import RankFailed, Ranks
from ..fingerprint import WHAT, model_fingerprint, options_fingerprint
from ..match import head_group
from .options import CompileOptions


def least_bytes(gm, opts: CompileOptions) -> tuple[int, int]:
    """At least what compile writes of the weights, in bytes: (the quantized linears' int4 nibbles,
    every other parameter at 2 bytes, the token table and the head at half a byte when
    ``quantize_lm_head``). The scales, the zero points and the graph are left out: a lower bound
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


def head_search(gm, opts: CompileOptions):
    """(the head's group, its scheme) when the head is searched: a 4-bit head with calibration
    is searched like a group of its own (scale into the final norm, clipping); an 8-bit one is
    rounded to nearest (8 bits leave the search nothing to gain, at minutes of search:
    docs/deploying.md)."""
    if not (opts.quantize_lm_head and opts.lm_head_bits == 4 and not opts.rtn_only):
        return None
    head = head_group(gm)
    return (head, opts.head_scheme) if head else None


def same_model_on_every_rank(model, skeleton, opts: CompileOptions, ranks: Ranks) -> None:
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


def same_on_every_rank(calib_ids, source: str, ranks: Ranks) -> None:
    """Every rank read the same calibration tokens (each reads its own copy of a file: on
    several machines they may differ), and there is a sample for each rank. Every rank sees a
    fault here, and raises the same line."""
    if ranks.world == 1:
        return
    if calib_ids.shape[0] < ranks.world:
        raise RankFailed(f"calibration from {source} gave {calib_ids.shape[0]} samples, fewer than the "
                         f"{ranks.world} ranks: give at least one sample per rank (`n_samples`)")
    digests = ranks.gather(hashlib.sha256(calib_ids.numpy().tobytes()).hexdigest())
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RankFailed(f"rank {differ[0]}: calibration from {source} gave other tokens than rank 0's: every rank "
                         "must read the same calibration (the same file, or `calib=self`)")


