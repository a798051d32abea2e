"""The exported graph cut at its decoder layers (``LayerCut``: the part before them, each layer,
the part after), and a run of the program through a chosen subset of them (``run_layers``): the
search goes a part at a time, and the emission's check compares a shallow decoder with the
program run through the same layers."""
from __future__ import annotations

import torch
from torch import fx

from .analysis import computed_from_weights, decoder_layers
from .errors import InterpretError
from .ir import GraphModel, module_path, run_nodes


class LayerCut:
    """The graph cut into pre, decoder layer 0..n-1 and post stages, with the values each
    stage hands to later ones."""

    def __init__(self, gm: GraphModel):
        prefix, n = decoder_layers(gm)
        self.prefix, self.n = prefix, n
        calls = [node for node in gm.graph.nodes if node.op == "call_function"]

        def layer_of(node):
            mp = module_path(node)
            if mp.startswith(prefix + "."):
                part = mp[len(prefix) + 1:].split(".", 1)[0]
                if part.isdigit():
                    return int(part)
            return None

        stage_of: dict[fx.Node, int] = {}
        pending: list[fx.Node] = []
        seen_layer = False
        for node in calls:
            li = layer_of(node)
            if li is None:
                if seen_layer:
                    pending.append(node)  # between layers or after: joins the next stage
                else:
                    stage_of[node] = 0
                continue
            seen_layer = True
            for p in pending:
                stage_of[p] = li + 1
            pending = []
            stage_of[node] = li + 1
        for p in pending:
            stage_of[p] = n + 1
        self.stage_of = stage_of
        self.stages: list[list[fx.Node]] = [[] for _ in range(n + 2)]
        for node in calls:
            self.stages[stage_of[node]].append(node)
        # values produced at stage <= k and read at a stage > k: a value made at stage i and
        # read at stage j is handed on after stages i .. j-1
        self.keep_after: list[set] = [set() for _ in range(n + 2)]
        for node in calls:
            for a in node.all_input_nodes:
                if a.op == "call_function":
                    for k in range(stage_of[a], stage_of[node]):
                        self.keep_after[k].add(a)

    def _program(self, stage: int, sizes: bool = False) -> list[fx.Node]:
        """A stage's nodes that compute tensors (``sizes``: all of them). The trace computes a size
        expression once, in the first layer that needs it (a MoE model's layer 0 computes the
        experts' sizes every later layer reads), so the layers' programs are their tensor ops."""
        return [n for n in self.stages[stage] if sizes or isinstance(n.meta.get("val"), torch.Tensor)]

    def alike(self, a: int, b: int) -> bool:
        """Decoder layers ``a`` and ``b`` are the same program (the same ops in the same order)."""
        return [n.target for n in self._program(a + 1)] == [n.target for n in self._program(b + 1)]

    def counterpart(self, node: fx.Node, layer: int) -> fx.Node:
        """The node of decoder layer ``layer`` at ``node``'s place in its own layer."""
        own = self.stage_of[node]
        sizes = not isinstance(node.meta.get("val"), torch.Tensor)
        mine, other = self._program(own, sizes), self._program(layer + 1, sizes)
        index = mine.index(node)
        if len(other) != len(mine) or other[index].target != node.target:
            raise InterpretError(f"decoder layers {own - 1} and {layer} are not the same program "
                                 f"(at {node.name}): they cannot stand in for each other")
        return other[index]


def params_read(gm: GraphModel, nodes, device=None) -> dict:
    """The parameters ``nodes`` read, placeholder -> tensor, on ``device`` (None or the CPU: the
    tensors themselves)."""
    env = {}
    for node in nodes:
        for a in node.all_input_nodes:
            name = gm.param_of(a)
            if name is not None and a not in env:
                env[a] = gm.params[name] if device is None else gm.params[name].to(device)
    return env


def run_layers(gm: GraphModel, input_ids: torch.Tensor, layers: list[int], made: dict[str, object] | None = None,
               fixed: dict[fx.Node, torch.Tensor] | None = None, stages: LayerCut | None = None) -> torch.Tensor:
    """Logits of the program run through decoder ``layers`` only, in that order (each layer's
    input the previous chosen one's output), then the final norm and head; ``made`` and
    ``fixed`` as in ``GraphModel.run``. With every layer, this is ``GraphModel.run``."""
    stages = stages or LayerCut(gm)
    makers = {gm.param_node(name): make for name, make in (made or {}).items()}
    makers = {**gm.param_makers(skip=set(makers)), **makers}
    env = {gm.input_node(): input_ids, **(fixed or {})}
    calls = {n for stage in stages.stages for n in stage}
    # a value made from the weights alone and read only in its own stage goes with its last reader
    # (kept, an expert bank's transpose would keep the dequantized bank of every layer run)
    keep = calls - {n for n in computed_from_weights(gm, [n for s in stages.stages for n in s])
                    if all(stages.stage_of.get(u) == stages.stage_of[n] for u in n.users)}
    previous = None  # the layer run last
    for stage in [0] + [li + 1 for li in layers] + [stages.n + 1]:
        for node in stages.stages[stage]:
            for a in node.all_input_nodes:
                made_at = stages.stage_of.get(a)
                if made_at is None or made_at == 0 or made_at == stage:
                    continue  # a parameter, the input, the pre stage's values, or its own
                if a in env and not isinstance(a.meta.get("val"), torch.Tensor):
                    continue  # a size: the trace computes one expression once for every layer using it
                if previous is None or made_at != stage - 1:
                    raise InterpretError(f"{node.name} reads {a.name} of another layer than the one before it")
                env[a] = env[stages.counterpart(a, previous)]
        nodes = [n for n in stages.stages[stage] if n not in env]
        run_nodes(nodes, env, made=makers, keep=keep)
        if 0 < stage <= stages.n:
            previous = stage - 1
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    return env[out]
