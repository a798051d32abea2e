"""What decides a compile's result, as short digests the ranks of a distributed compile compare
before the search: the model's config, its tensors' names, shapes and dtypes, a sample of their
bytes, and the options. Two ranks given two checkpoints of one shape would otherwise sum the
statistics of two models; two shapes would meet first inside a collective.

The bytes are sampled, not read whole: a few KiB at the start, middle and end of every tensor,
read from the checkpoint file where the compile streams it (no tensor is materialised), so the
digest costs seconds at any size and still tells another fine-tune of the same shape apart.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import fields

import torch

SAMPLE_BYTES = 4096  # per place sampled in each tensor


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stored_sample(weights, name: str) -> bytes | None:
    """Bytes of the stored tensor ``name`` at its start, middle and end, where the checkpoint
    reader can give them without reading the tensor (None where it cannot)."""
    sample = getattr(weights, "sample_bytes", None)
    return sample(name, SAMPLE_BYTES) if sample is not None else None


def _tensor_sample(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    n = max(1, SAMPLE_BYTES // max(1, flat.element_size()))
    middle = flat.numel() // 2
    parts = [flat[:n], flat[middle:middle + n], flat[-n:]]
    return b"".join(p.contiguous().view(torch.uint8).numpy().tobytes() for p in parts)


def model_fingerprint(model, weights=None, aliases: dict[str, str] | None = None) -> dict[str, str]:
    """{"config", "tensors", "bytes"}: digests of ``model``'s config (its path left out), of its
    parameters' names, shapes and dtypes, and of samples of their values (``weights``: the
    streamed checkpoint the meta-device ``model`` reads; None: the model's own tensors)."""
    config = model.config.to_dict()
    for key in ("_name_or_path", "name_or_path", "transformers_version"):
        config.pop(key, None)
    params = list(model.named_parameters())
    manifest = [(name, list(p.shape), str(p.dtype)) for name, p in params]
    values = hashlib.sha256()
    for name, param in params:
        stored = (aliases or {}).get(name, name)
        if weights is not None:
            sample = _stored_sample(weights, stored)
            if sample is None:
                continue
        else:
            sample = _tensor_sample(param)
        values.update(name.encode() + sample)
    return {"config": _digest(config), "tensors": _digest(manifest), "bytes": values.hexdigest()[:16]}


def options_fingerprint(options) -> str:
    """The options that decide the result; where the search runs (``device``) does not, nor does
    what only rank 0 writes."""
    skip = {"device", "overwrite", "export_hf"}
    return _digest({f.name: repr(getattr(options, f.name)) for f in fields(options) if f.name not in skip})


WHAT = {"config": "its config.json", "tensors": "its tensors' names, shapes or dtypes",
        "bytes": "its weights' values (another checkpoint of the same shape)", "options": "its options"}
