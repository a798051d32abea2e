"""``export_hf``: the AWQ-scaled model as a compressed-tensors checkpoint, llm-compressor's
"pack-quantized" format (transformers with the ``compressed-tensors`` package and vLLM load it), made
of the same integers as model.onnx, so that one compile serves ONNX Runtime and GPU servers.

The format, as compressed-tensors 0.20 reads it (``compressors/pack_quantized``): per quantized
``nn.Linear``, ``weight_packed`` (out, in / 8) int32, eight 4-bit values a word, the first in the
lowest bits, each stored as its signed value (-8..7) plus 8; ``weight_scale`` (out, groups) in the
model's dtype; ``weight_shape`` [out, in]; and, for an asymmetric scheme, ``weight_zero_point``
(ceil(out / 8), groups) int32, the signed zero points packed the same way along the rows. The
weight is (q - zero) * scale. Our integers are unsigned (0..15, zero 0..15): the signed value plus
8 is our own integer, so ``weight_packed`` is MatMulNBits' nibble stream (low nibble first) read as
little-endian words, and the zero points are ours packed along the rows.

What stays float: the token table, the norms (folded: they carry the AWQ scales), the head, and any
linear the search left float (an MoE router). The model's other tensors are written in its dtype,
a shard at a time (``SHARD_BYTES``), so the export holds one shard, never the model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .core.analysis import quantizable_linears
from .core.group_fit import GroupFit
from .core.progress import no_progress
from .core.numerics import QuantScheme, pack_nibbles
from .core.spill import SpilledWeight
from .load import WEIGHT_FILES, eval_dtype

FORMAT = "pack-quantized"
INDEX = WEIGHT_FILES[1]  # the shards' index, as transformers names it
SHARD_BYTES = 512 << 20  # a shard is written once it holds this much (a larger tensor is a shard of its own)


def export_refusal(gm, fit: GroupFit, scheme: QuantScheme, head_searched: bool) -> str | None:
    """Why this compile cannot be written as a compressed-tensors checkpoint (one line naming the
    linear or the option), or None. Read off the graph before the search starts."""
    if scheme.bits != 4:
        return f"`export_hf` writes 4-bit integers; the scheme {scheme.name} has {scheme.bits}"
    if head_searched:
        return ("`export_hf` keeps the head float, but a searched 4-bit head (`lm_head_bits=4`) folds its scale "
                "into the final norm: leave `lm_head_bits` at 8, or drop `export_hf`")
    for name in quantizable_linears(gm):
        site = gm.linears[name]
        if site.experts:
            return (f"`export_hf`: {name} is a bank of {site.experts} experts (one parameter, not nn.Linear "
                    "modules), which compressed-tensors' Linear targets do not cover")
        kind = gm.module_types.get(site.module)
        if kind != "Linear" or site.transposed:
            return (f"`export_hf`: {site.module} is a {kind}, not an nn.Linear "
                    "(compressed-tensors quantizes Linear modules)")
    return fit.whole_groups_refusal({name: gm.linears[name].module for name in fit.widths})


def quantization_config(scheme: QuantScheme, ignore: list[str]) -> dict:
    """The ``quantization_config`` of config.json, as llm-compressor writes it for W4A16 groups."""
    weights = {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric, "strategy": "group",
               "group_size": scheme.group_size, "dynamic": False, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": FORMAT}},
            "ignore": ignore, "kv_cache_scheme": None}


def _words(nibbles: np.ndarray) -> torch.Tensor:
    """Packed nibble bytes (rows, bytes), the first nibble lowest -> (rows, bytes / 4) int32 words
    (little-endian: eight values a word, the first in the lowest bits)."""
    return torch.from_numpy(np.ascontiguousarray(nibbles).view("<i4").astype(np.int32))


def packed_rows(blob: np.ndarray, out_features: int) -> torch.Tensor:
    """MatMulNBits' (out, groups, bytes) uint8 nibbles -> ``weight_packed`` (out, in / 8) int32."""
    return _words(blob.reshape(out_features, -1))


def packed_zero_points(zero: torch.Tensor) -> torch.Tensor:
    """Unsigned zero points (out, groups), 0..15 -> ``weight_zero_point`` (ceil(out / 8), groups)
    int32: eight rows a word, the first in the lowest bits (the signed zero point plus 8 is ours)."""
    z = zero.to(torch.uint8).T  # (groups, out): packed along the rows
    z = torch.nn.functional.pad(z, (0, -z.shape[1] % 8))
    return _words(pack_nibbles(z).numpy()).T.contiguous()


def checkpoint_dtype(model, source: Path | None) -> torch.dtype:
    """The dtype the float tensors and the scales are written in: the source checkpoint's stored
    dtype (its safetensors headers; a GGUF is dequantized: float32), or a model object's own."""
    if source is not None:
        return eval_dtype(source, "stored")[0]
    configured = getattr(model.config, "dtype", None)  # a bfloat16 model compile copied to float32 says bfloat16
    if isinstance(configured, torch.dtype) and configured.is_floating_point:
        return configured
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _tensor_names(model) -> list[str]:
    """The names a checkpoint of ``model`` holds: its parameters (a tied one once) and its
    persistent buffers, in the model's order."""
    params = {name for name, _ in model.named_parameters()}
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return [name for name in model.state_dict(keep_vars=True) if name in params or name not in every]


def write_compressed_checkpoint(folder: Path, gm, model, quantized: dict, scheme: QuantScheme, dtype: torch.dtype,
                                tokenizer=None, progress=None) -> dict:
    """Write the checkpoint into ``folder`` (empty): safetensors shards with their index,
    config.json with the quantization_config, generation_config.json, the tokenizer. ``quantized``:
    linear name -> its held integers (``PackedWeight`` or ``SpilledWeight``); ``dtype``: that of the
    float tensors and scales (``checkpoint_dtype``). Returns what the report says of it (the pipeline adds the folder)."""
    progress = progress or no_progress
    linears = {gm.linears[n].weight: gm.linears[n] for n in quantized if n in gm.linears and not gm.linears[n].experts}
    names = _tensor_names(model)
    state = model.state_dict(keep_vars=True)
    shard: dict[str, torch.Tensor] = {}
    shard_of: dict[str, int] = {}  # tensor name -> its shard's number (from 1)
    size, written, total_bytes, shards = 0, 0, 0, 0

    def flush():
        nonlocal size, shard, shards
        if shard:
            shards += 1
            save_file(shard, folder / f"part-{shards}.safetensors", metadata={"format": "pt"})
            shard_of.update(dict.fromkeys(shard, shards))
            shard, size = {}, 0

    for name in progress(names, "compressed-tensors checkpoint", len(names)):
        site = linears.get(name)
        if site is not None:
            held = quantized[site.module]
            packed = held.packed() if isinstance(held, SpilledWeight) else held
            prefix = name.removesuffix(".weight")
            tensors = {prefix + ".weight_packed": packed_rows(packed.blob.numpy(), site.out_features),
                       prefix + ".weight_scale": packed.scale.reshape(site.out_features, -1).to(dtype),
                       prefix + ".weight_shape": torch.tensor([site.out_features, site.in_features])}
            if not scheme.symmetric:
                tensors[prefix + ".weight_zero_point"] = packed_zero_points(packed.zero)
            written += 1
        else:
            value = (gm.params[name] if name in gm.params else state[name]).detach()
            if value.is_meta:
                raise RuntimeError(f"awq-graph bug: {name} has no value to export")
            tensors = {name: value.to(dtype if value.is_floating_point() else value.dtype, copy=True).contiguous()}
        for key, tensor in tensors.items():
            shard[key] = tensor
            size += tensor.numel() * tensor.element_size()
            total_bytes += tensor.numel() * tensor.element_size()
        if size >= SHARD_BYTES:
            flush()
    flush()
    file_of = {i: f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)}  # transformers' names
    for i, file in file_of.items():
        (folder / f"part-{i}.safetensors").rename(folder / file)
    weight_map = {name: file_of[i] for name, i in shard_of.items()}
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map},
                                           indent=2) + "\n")
    ignore = sorted(m for m, kind in gm.module_types.items() if kind == "Linear" and m not in quantized)
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(scheme, ignore)
    config.pop("torch_dtype", None)  # transformers 5 reads "dtype" (and warns at the old name)
    config["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return {"format": FORMAT, "quantized_linears": written, "ignored": ignore,
            "dtype": str(dtype).removeprefix("torch."), "shards": shards}
