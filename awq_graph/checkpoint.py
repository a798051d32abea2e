"""A checkpoint checked against the model its config builds, before any tensor is read.

A compile must never run on weights that are not the checkpoint's: transformers fills a missing
parameter with random values and drops a tensor the config has no place for, and a float
parameter stored as integers would be read as numbers. So every parameter must be stored (or tied
to one that is), under its shape and in a float dtype; a tensor the model has no parameter for is
a fault when it belongs to a decoder layer past the config's count (the config and the weights
disagree on the depth), and otherwise a note (a buffer an older transformers saved, say). Both the
streamed path (the stored names and header shapes) and transformers' whole-model loading (its
``output_loading_info``) are judged here, by the same rules.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from .core.errors import InputError

NAMED = 3  # how many tensors a line names before "and N more"

_LAYER = re.compile(r"^(.*?)\.(\d+)\.")  # "model.layers.12.mlp..." -> ("model.layers", 12)


def _listed(names: Iterable[str]) -> str:
    names = sorted(names, key=_natural)
    more = f" and {len(names) - NAMED} more" if len(names) > NAMED else ""
    return ", ".join(f"'{n}'" for n in names[:NAMED]) + more


def _natural(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _layers(names: Iterable[str]) -> dict[str, set[int]]:
    """The indices under each numbered prefix (``model.layers`` -> {0, 1}) of ``names``."""
    found: dict[str, set[int]] = {}
    for name in names:
        m = _LAYER.match(name)
        if m:
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
    return found


def _depth_fault(missing: set[str], unexpected: set[str], param_names: Iterable[str], where: str) -> str | None:
    """The line for a config whose layer count is not the checkpoint's: tensors of layers past the
    config's last one, or every tensor of the config's last layers missing."""
    model_layers = _layers(param_names)
    for prefix, indices in model_layers.items():
        depth = max(indices) + 1
        extra = {n for n in unexpected if (m := _LAYER.match(n)) and m.group(1) == prefix and int(m.group(2)) >= depth}
        if extra:
            stored = max(int(_LAYER.match(n).group(2)) for n in extra) + 1
            return (f"the config says {depth} layer(s) under '{prefix}', and {where} holds {stored} "
                    f"({_listed(extra)} have no place in the model): config.json does not belong to these weights")
        params_of = {i: {n for n in param_names if n.startswith(f"{prefix}.{i}.")} for i in indices}
        lost = sorted(i for i, names in params_of.items() if names and names <= missing)  # no tensor of the layer
        if lost and lost[0] > 0 and lost == list(range(lost[0], depth)):
            return (f"the config says {depth} layers under '{prefix}', and {where} holds {lost[0]} (no tensor of "
                    f"layer{'s' if len(lost) > 1 else ''} {lost[0]}{f'-{depth - 1}' if len(lost) > 1 else ''}): "
                    "config.json does not belong to these weights")
    return None


def check_stored(stored: dict[str, tuple[tuple[int, ...] | None, torch.dtype | None]], model, aliases: dict[str, str],
                 where: str) -> list[str]:
    """Every parameter of ``model`` (built from the checkpoint's config) against ``stored``: name
    -> (shape, dtype) as the checkpoint's headers give them (None where a format does not say,
    GGUF's quantized blocks). ``aliases``: parameters tied to a stored one. Raises the first fault;
    returns notes on stored tensors left unread."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = {name for name, _ in model.named_buffers()}
    missing = {n for n in params if n not in stored and n not in aliases}
    unexpected = {n for n in stored if n not in params and n not in buffers}
    fault = _depth_fault(missing, unexpected, list(params), where)
    if fault:
        raise InputError(fault)
    if missing:
        raise InputError(f"{where} lacks {len(missing)} tensor(s) the model's config needs: {_listed(missing)}: it is "
                         "incomplete or another model's; nothing was compiled (no weight is ever made up)")
    for name, param in params.items():
        if name not in stored:
            continue
        shape, dtype = stored[name]
        if dtype is not None and param.is_floating_point() and not dtype.is_floating_point:
            raise InputError(f"tensor '{name}' in {where} is stored as {str(dtype).removeprefix('torch.')}, and the "
                             "model's parameter is floating point: a quantized checkpoint needs the quantization_config "
                             "that says how to read it (none in config.json)")
        if shape is not None and tuple(shape) != tuple(param.shape):
            raise InputError(f"tensor '{name}' in {where} has shape {tuple(shape)}, the model's config says "
                             f"{tuple(param.shape)}")
    return [f"{len(unexpected)} tensor(s) in {where} are no parameter of the model and are not read: "
            f"{_listed(unexpected)}"] if unexpected else []


def check_loading_info(info: dict, model, where: str) -> list[str]:
    """transformers' loading report (``output_loading_info=True``) by the same rules: missing or
    mismatched parameters and a depth the config does not have are faults; other unexpected
    tensors a note."""
    missing, unexpected = set(info.get("missing_keys") or ()), set(info.get("unexpected_keys") or ())
    params = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    fault = _depth_fault(missing, unexpected, params, where)
    if fault:
        raise InputError(fault)
    if missing:
        raise InputError(f"{where} lacks {len(missing)} tensor(s) the model's config needs: {_listed(missing)}: it is "
                         "incomplete or another model's; nothing was compiled (no weight is ever made up)")
    mismatched = sorted(info.get("mismatched_keys") or (), key=str)  # (name, stored shape, the model's shape)
    if mismatched:
        name, stored, wanted = (list(mismatched[0]) + [None, None])[:3]
        raise InputError(f"tensor '{name}' in {where} has shape {tuple(stored or ())}, the model's config says "
                         f"{tuple(wanted or ())}")
    errors = info.get("error_msgs") or []
    if errors:
        raise InputError(f"transformers could not load {where}: {str(errors[0]).splitlines()[0]}")
    return [f"{len(unexpected)} tensor(s) in {where} are no parameter of the model and are not read: "
            f"{_listed(unexpected)}"] if unexpected else []


def integer_floats(weights, model) -> list[str]:
    """Stored tensors in an integer dtype under the name of a floating-point parameter of ``model``
    (transformers' whole-model loading would cast their integers to float without a word)."""
    floats = {name for name, p in model.named_parameters(remove_duplicate=False) if p.is_floating_point()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    bad = []
    for name in weights.names():
        if weights.dtype(name).is_floating_point:
            continue
        if name in floats or f"{prefix}.{name}" in floats or name.removeprefix(f"{prefix}.") in floats:
            bad.append(name)
    return bad
