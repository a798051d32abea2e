"""What compile checks of the graph, the options and the ranks before the long work: the group sizes the graph takes, the disk space OUT needs, the ranks' agreement."""
from __future__ import annotations

import hashlib
import math

from ..core.analysis import output_head, quantizable_linears, token_table
from ..core.errors import InputError
from ..core.numerics import n_groups
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


def group_fit(gm, group_size: int) -> list[str]:
    """Refuse a group size wider than every quantized linear's input (each row would be one
    padded block: a file larger than the float one); warn when only some are narrower, and when
    inputs are not a multiple of it: MatMulNBits pads each row's last group (SmolLM2's 576-wide
    inputs at group 128: 4.5 groups written as 5), naming the group size that divides them all."""
    widths = {name: gm.linears[name].in_features for name in quantizable_linears(gm)}
    narrow = sorted(n for n, w in widths.items() if w < group_size)
    if narrow and len(narrow) == len(widths):
        widest = max(widths, key=widths.get)
        raise InputError(f"group size {group_size} (`group_size`) is wider than every quantized layer's input "
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
                        + (f"; `group_size={divides}` divides every input" if divides else ""))
    return warnings


def check_head_group(gm, opts: CompileOptions) -> None:
    """A quantized head's group may not be wider than its input: each row would be one padded
    block, a head larger than at the group that fits."""
    head = output_head(gm) if opts.quantize_lm_head else None
    if head is None:
        return
    width, group = gm.linears[head].in_features, opts.head_scheme.group_size
    if group > width:
        raise InputError(f"`lm_head_group_size={group}` is wider than the head's input ({head}: {width}): choose at "
                         f"most {width} (each row would be one padded block)")
