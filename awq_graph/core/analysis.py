"""Facts read off the exported graph, shared by the stages: which block repeats, which linears
are quantized, which linear writes the logits, which lookup reads the token ids. Each is a
function of the graph that returns data; none edits it."""
from __future__ import annotations

from collections import Counter

import torch
from torch import fx

from .errors import ConfigError, ExportError
from .ir import GraphModel, Steps, run_nodes

aten = torch.ops.aten


def real_users(node: fx.Node) -> list[fx.Node]:
    """Users that compute something (export's metadata assertions do not)."""
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def ancestors(node: fx.Node, within: set | None = None) -> set[fx.Node]:
    """``node`` and every node its value depends on (its inputs, theirs, ...); with ``within``,
    only those nodes, walked only through them."""
    found, frontier = set(), [node]
    while frontier:
        n = frontier.pop()
        if n in found or (within is not None and n not in within):
            continue
        found.add(n)
        frontier.extend(n.all_input_nodes)
    return found


def example_values(gm: GraphModel, seq: int = 6, progress=None) -> dict:
    """Concrete values of every node for a small input: shapes for the analysis (at the length
    the export fixed, if it did). ``progress``: a bar over the parameters read (a pass over a
    large checkpoint, from disk)."""
    seq = gm.fixed_seq or seq
    ids = torch.arange(1, seq + 1).unsqueeze(0) % 7 + 1  # (1, seq)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    of_weights = computed_from_weights(gm, nodes)
    makers = gm.param_makers()
    # the parameters read where used, then dropped; looked up again when asked
    with torch.no_grad(), Steps(progress, "analysing the graph", len(makers)) as steps:
        env = run_nodes(nodes, {gm.input_node(): ids}, made={node: steps.after(make) for node, make in makers.items()},
                        keep={*nodes, gm.input_node()} - of_weights)
    return _WithParams(env, gm, of_weights)


def computed_from_weights(gm: GraphModel, nodes: list[fx.Node]) -> set[fx.Node]:
    """The ``nodes`` (in graph order) whose value is computed from parameters alone (an expert
    bank's transpose, a rotary table): held, such a value holds its parameters (a view, often)."""
    found: set[fx.Node] = set()
    for n in nodes:
        if n.all_input_nodes and all(a in found or gm.param_of(a) is not None for a in n.all_input_nodes):
            found.add(n)
    return found


class _WithParams(dict):
    """Node values, with a parameter read (from the checkpoint, when streamed) when it is looked up,
    and a value computed from parameters alone made again: held, such a value (a view, often) would
    hold its parameters, every layer's MoE banks at once."""

    def __init__(self, env: dict, gm: GraphModel, of_weights: set = frozenset()):
        super().__init__(env)
        self._gm = gm
        self._of_weights = of_weights
        self._last: tuple = (None, None)  # the analysis asks for one weight several times in a row

    def __missing__(self, node):
        name = self._gm.param_of(node)
        if name is None:
            if node not in self._of_weights:
                raise KeyError(node)
            with torch.no_grad():
                return node.target(*fx.node.map_arg(node.args, self.__getitem__),
                                   **fx.node.map_arg(node.kwargs, self.__getitem__))
        if self._last[0] != name:
            self._last = (None, None)  # the previous one dropped before the next is read
            self._last = (name, self._gm.params[name])
        return self._last[1]


def decoder_layers(gm: GraphModel) -> tuple[str, int]:
    """The repeated block that holds the linears: ("model.layers", 30) for Llama."""
    counts: Counter = Counter()
    indices: dict[str, set] = {}
    for path in gm.linears:
        parts = path.split(".")
        for k in range(len(parts) - 1, 0, -1):
            if parts[k].isdigit():
                prefix = ".".join(parts[:k])
                counts[prefix] += 1
                indices.setdefault(prefix, set()).add(int(parts[k]))
                break
    if not counts:
        raise ConfigError("no repeated decoder block with linear layers was found in the graph")
    prefix = max(counts, key=lambda p: (counts[p], -len(p)))
    return prefix, max(indices[prefix]) + 1


def layer_linears(gm: GraphModel, prefix: str, i: int) -> list[str]:
    """The linears of decoder layer ``i`` under ``prefix``, in graph order."""
    return [name for name in gm.linears if name.startswith(f"{prefix}.{i}.")]


def quantizable_linears(gm: GraphModel) -> list[str]:
    """Linears of the decoder layers with a private weight, MoE expert banks included. The
    lm_head, tied weights and MoE routers (their output picks the experts: a rounding error
    there sends tokens elsewhere) stay float."""
    prefix, _ = decoder_layers(gm)
    return [n for n, site in gm.linears.items()
            if n.startswith(prefix + ".") and len(real_users(site.weight_node)) == 1
            and not routes_tokens(site.node)]


def output_head(gm: GraphModel) -> str | None:
    """The linear that writes the logits (``lm_head``), found from the graph output."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    # back through casts and gemma2's softcap c * tanh(x / c): ops of one tensor and constants
    passthrough = (aten.to.dtype, aten._to_copy.default, aten.alias.default, aten.tanh.default,
                   aten.div.Tensor, aten.mul.Tensor, aten.div.Scalar, aten.mul.Scalar)
    while (out.op == "call_function" and out.target in passthrough
           and sum(isinstance(a, fx.Node) for a in out.args) == 1 and isinstance(out.args[0], fx.Node)):
        out = out.args[0]
    return next((name for name, site in gm.linears.items() if site.node is out), None)


def token_lookup(gm: GraphModel) -> fx.Node:
    """The aten.embedding node that looks up input_ids (GPT-2 also looks up positions)."""
    input_node = gm.input_node()
    for node in gm.graph.nodes:
        if node.target is aten.embedding.default:
            ids = node.args[1]
            while ids is not input_node and ids.op == "call_function" and ids.args:  # views of input_ids
                ids = ids.args[0]
            if ids is input_node:
                return node
    raise ExportError("the graph has no embedding lookup of input_ids")


def token_table(gm: GraphModel) -> str:
    """The parameter name of the table the token lookup reads (``model.embed_tokens.weight``)."""
    return gm.param_of(token_lookup(gm).args[0])


def head_reads_token_table(gm: GraphModel) -> bool:
    """True when the head's weight is the token table's placeholder itself (tied embeddings)."""
    head = output_head(gm)
    return head is not None and gm.linears[head].weight == token_table(gm)


def _reaches(site_node: fx.Node, hit, depth: int = 16) -> bool:
    """True when the linear's output reaches a node ``hit(node, operand)`` accepts before the
    next linear."""
    frontier, seen = [site_node], set()
    for _ in range(depth):
        nxt = []
        for node in frontier:
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                if hit(user, node):
                    return True
                if user.target in (aten.linear.default, aten.addmm.default):
                    continue
                nxt.append(user)
        frontier = nxt
    return False


def feeds_attention_scores(site_node: fx.Node) -> bool:
    """True when the linear's output reaches softmax or the q/k operand of attention."""
    return _reaches(site_node, lambda user, operand: user.target in (aten._softmax.default, aten.softmax.int) or (
        user.target is aten.scaled_dot_product_attention.default and operand in user.args[:2]))


def routes_tokens(site_node: fx.Node) -> bool:
    """True for an MoE router: its output reaches the top-k that picks the experts."""
    return _reaches(site_node, lambda user, operand: user.target is aten.topk.default, depth=8)
