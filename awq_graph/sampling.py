"""Self-calibration text sampled with the compile's own product: an 8-bit round-to-nearest decoder
written from the program already exported (seconds: no second load of the model), run by
onnxruntime with every sample of a batch advancing one token per step against one KV cache.

Why this and not transformers' ``generate`` on the float model: ``generate`` needs the whole model
in memory (several times what the streamed compile takes) and costs several times the AWQ search;
an 8-bit decoder's text is close to the float model's, and what it costs is an RTN compile's
memory and a batched int8 decode (docs/default-path.md). The head is 8-bit too and the token table
int4 for the sampler (a float32 head would be a large share of each step's work). Each batch draws
from its own generator, seeded by (seed, batch), so that ranks sampling every N-th batch together
hold what one process samples.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from .core.analysis import token_table
from .core.numerics import QuantScheme
from .core.progress import no_progress
from .core.spill import IntegerSpill
from .emit import write_onnx
from .head_table import quantize_head, quantize_token_table, shares_head, token_table_of_head
from .search import rtn

BATCH = 64  # samples advancing together: past a few dozen, a larger batch adds little decode speed
TOP_K = 50
KV_BUDGET = 1 << 30  # bytes of keys and values a batch may hold (Llama-3-8B at 512 tokens: 134 MB a sample)


def can_sample(plan) -> bool:
    """The program's fused KV-cache decoder can be written (the sampler's graph)."""
    return bool(plan.kv_decoder)


def sampled_ids(gm, model, plan, scheme: QuantScheme, bos: int, n_samples: int, seqlen: int, seed: int, scratch: Path,
                progress=None, ranks=None, batch: int = BATCH) -> torch.Tensor:
    """(n_samples, seqlen) token ids sampled from the 8-bit round-to-nearest decoder of ``gm``: each
    sample starts at ``bos`` and a random second token (keeps the samples apart), then top-50 at
    temperature 1. ``scheme``: the compile's (its group size; the token table at it).
    ``scratch``: a new folder the sampler's model is written into (removed when done).
    ``ranks``: each samples every N-th batch, and every rank returns the whole set."""
    from .core.ranks import ONE
    from .runtime import CompiledModel

    ranks = ranks or ONE
    progress = progress or no_progress
    vocab = int(gm.param_shape(token_table(gm))[0])
    batch = max(1, min(batch, KV_BUDGET // max(1, _kv_bytes_per_row(model, seqlen))))
    batch = -(-n_samples // -(-n_samples // batch))  # even batches: 132 samples as 3 x 44, not 64 + 64 + 4
    batches = list(range(0, n_samples, batch))
    mine = [i for k, i in enumerate(batches) if k % ranks.world == ranks.rank]
    rows = {}
    try:
        if mine:
            _write_sampler(gm, model, plan, scheme, scratch)
            decoder = CompiledModel(scratch)
            for i in progress(mine, "self-calibration (int8 decoder)", len(mine)):
                rng = np.random.default_rng([seed, i // batch])
                count = min(batch, n_samples - i)
                starts = np.stack([np.full(count, bos), rng.integers(0, vocab, count)], 1).astype(np.int64)
                rows[i] = decoder.sample_rows(starts, seqlen, rng, top_k=TOP_K)
            del decoder
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if ranks.world > 1:
        for share in ranks.gather(rows):
            rows.update(share)
    return torch.from_numpy(np.concatenate([rows[i] for i in batches]))


def _kv_bytes_per_row(model, seqlen: int) -> int:
    """A sample's keys and values in float32 over every layer (0 where the config does not say)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_attention_heads", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not heads or not layers:
        return 0
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(layers) * 2 * int(kv_heads) * int(head_dim) * seqlen * 4


def _write_sampler(gm, model, plan, scheme: QuantScheme, folder: Path) -> None:
    """The 8-bit round-to-nearest decoder of ``gm`` (at ``scheme``'s group size; the table int4)
    into ``folder``; the checkpoint's weights stay readable for the search. 8 bits, not 4: text
    sampled from an int4 round-to-nearest model is that model's own, and on it the held-aside check
    found round-to-nearest better than the float model, and wrote it in place of the search's
    result (docs/default-path.md)."""
    eight = QuantScheme(8, scheme.group_size, scheme.symmetric)
    spill = IntegerSpill(folder / ".integers.spill")
    try:
        quantized = dict(rtn(gm, eight, keep=spill.put, spend=False).quantized)
        head, quantized_head = quantize_head(gm, eight)
        quantized[head] = quantized_head
        table = (token_table_of_head(head, quantized_head, []) if shares_head(gm, eight, scheme)
                 else quantize_token_table(gm, scheme))
        write_onnx(gm, quantized, folder / "model.onnx", model=model, accuracy_level=4, act_dtype="float32",
                   quantized_table=table, plan=plan)
    finally:
        spill.close()
