"""The float baseline, streamed: ``eval MODEL`` runs the exported program a decoder layer at a time
over the windows, so its memory is about one layer in float32 plus the windows' activations at any
depth (an 8B checkpoint's whole-model eval took 16 GB in bfloat16; its float32 copy 32 GB).

The windows' values between layers (the hidden states, and what the pre stage hands every layer:
rotary tables, masks) are held for as many windows as ``ACTIVATION_BUDGET`` allows, and the layers
are read once per such pass: every window at once for SmolLM2 (4.7 MB per 2048-token window), a few
passes for an 8B model (32 MB per window), rather than spilling activations to disk or reading the
model once per window.
"""
from __future__ import annotations

import math

import torch

from .core.progress import no_progress
from .core.layer_cut import LayerCut, params_read

ACTIVATION_BUDGET = 1 << 30  # bytes of per-window values held at once


def windows_of(ids, seqlen: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """The non-overlapping windows of ``seqlen`` tokens that ``eval`` scores, each (1, seqlen)."""
    from .core.errors import InputError

    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n = ids.numel() // seqlen
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise InputError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return [ids[w * seqlen:(w + 1) * seqlen].unsqueeze(0) for w in range(n)]


def _bytes(store: dict) -> int:
    return sum(v.numel() * v.element_size() for v in store.values() if isinstance(v, torch.Tensor))


def streamed_perplexity(gm, windows: list[torch.Tensor], progress=None,
                        budget: int = ACTIVATION_BUDGET) -> tuple[float, int]:
    """exp(mean next-token NLL) of the program ``gm`` (its parameters read from the checkpoint as
    each stage needs them) over ``windows``, as ``runtime.perplexity`` scores them; (ppl, tokens)."""
    from .core.ir import run_nodes
    from .runtime import window_nll

    progress = progress or no_progress
    stages = LayerCut(gm)
    input_node = gm.input_node()
    out_node = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    steps = len(windows) * (stages.n + 2)
    bar = iter(progress(range(steps), "perplexity (a layer at a time)", steps))
    nll, count = 0.0, 0
    with torch.no_grad():
        per_window = _bytes(_run(gm, stages, 0, windows[0], {}, input_node))  # the pre stage's values
        per_pass = max(1, budget // max(1, per_window))
        for start in range(0, len(windows), per_pass):
            batch = windows[start:start + per_pass]
            stores = [{} for _ in batch]
            for stage in range(stages.n + 2):
                params = params_read(gm, stages.stages[stage])  # the stage's weights, read once per pass
                for w, ids in enumerate(batch):
                    if stage <= stages.n:
                        stores[w] = _run(gm, stages, stage, ids, {**params, **stores[w]}, input_node)
                    else:
                        env = {**params, **stores[w], input_node: ids}
                        run_nodes(stages.stages[stage], env)
                        nll += window_nll(env[out_node][0, :-1], ids[0, 1:])
                        count += ids.shape[1] - 1
                        stores[w] = {}
                        del env
                    next(bar, None)
                del params
    return math.exp(nll / count), count


def _run(gm, stages: LayerCut, stage: int, ids: torch.Tensor, env: dict, input_node) -> dict:
    """The values stage ``stage`` hands on, for one window (``env``: its parameters and the values
    handed to it)."""
    from .core.ir import run_nodes

    nodes = stages.stages[stage]
    env = {**(params_read(gm, nodes) if not env else {}), **env, input_node: ids}
    run_nodes(nodes, env)
    return {n: env[n] for n in stages.keep_after[stage]}


def streamed_program(path, seqlen: int):
    """(the checkpoint's exported program reading its weights one tensor at a time, None), or
    (None, why it is evaluated whole instead: a checkpoint transformers converts on loading, an
    export that needs the model in memory)."""
    from .export import StreamingUnsupported, export_model
    from .load import open_skeleton

    skeleton, why = open_skeleton(path)
    if skeleton is None:
        return None, why
    try:
        return export_model(skeleton.model, skeleton=skeleton, seqlen=seqlen), None
    except StreamingUnsupported as exc:
        return None, str(exc)
