"""The IR: an exported causal LM (``GraphModel``), its parameters by module name, its linear
layers (``LinearSite``), and a small interpreter that runs any part of it.

Names: every module path and parameter name is the Hugging Face one (``model.layers.0.
self_attn.q_proj``), exactly what a Quark config names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import fx

from .errors import InterpretError


@runtime_checkable
class StreamedParams(Protocol):
    """A parameter store that reads each tensor from the checkpoint when asked
    (``awq_graph.weights.ParamStore``), its shapes known without reading; a plain dict of
    tensors is the model held in memory."""

    def shape_of(self, name: str) -> torch.Size: ...

    def release(self, names, spent: bool = False) -> None: ...

PREFIX = "lm."  # the attribute of the exported wrapper (``awq_graph.export``): stripped from every name


@dataclass(frozen=True)
class LinearSite:
    """One linear map over a parameter weight: ``aten.linear(x, W[out, in], b)``, GPT-2's
    Conv1D ``aten.addmm(b, x, W[in, out])`` (``transposed``), or a bank of MoE experts,
    ``transformers.grouped_mm_fallback(x, W[E, out, in]^T, offsets)`` (``experts``: each token
    row meets one expert's (out, in) matrix; its name is the weight's, since one experts module
    holds two banks)."""

    module: str  # "model.layers.0.self_attn.q_proj"
    node: fx.Node
    input: fx.Node  # the activation operand
    weight_node: fx.Node  # the weight's placeholder
    weight: str  # parameter name
    bias: str | None
    out_features: int
    in_features: int
    transposed: bool = False
    experts: int = 0  # E for a bank of experts, else 0

    def matrix(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weight as (out, in); a bank of experts as its (E * out, in) rows, expert by
        expert. A view, so in-place edits reach the parameter."""
        w = params[self.weight]
        if self.experts:
            return w.view(self.experts * self.out_features, self.in_features)
        return w.T if self.transposed else w

    def stored(self, matrix: torch.Tensor) -> torch.Tensor:
        """A ``matrix``-shaped tensor in the parameter's own layout."""
        if self.experts:
            return matrix.reshape(self.experts, self.out_features, self.in_features)
        return matrix.T.contiguous() if self.transposed else matrix


def module_path(node: fx.Node) -> str:
    """The innermost module a node was traced in, HF naming; "" for the top level."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = path.removeprefix("L['self'].")
    return path[len(PREFIX):] if path.startswith(PREFIX) else ("" if path + "." == PREFIX else path)


def in_module(node: fx.Node, path: str) -> bool:
    mp = module_path(node)
    return mp == path or mp.startswith(path + ".")


@dataclass
class GraphModel:
    """An ExportedProgram with its parameters addressable by HF name.

    ``params`` holds the very tensors the program uses: a fold that edits them in place
    edits the program (and what ONNX export sees).
    """

    program: torch.export.ExportedProgram
    params: dict[str, torch.Tensor]  # HF parameter/buffer name -> tensor
    placeholder_param: dict[str, str]  # placeholder node name -> HF name
    linears: dict[str, LinearSite] = field(default_factory=dict)
    module_types: dict[str, str] = field(default_factory=dict)  # module path -> class name
    fixed_seq: int | None = None  # the sequence length the export fixed (``awq_graph.export``); None: any

    @property
    def graph(self) -> fx.Graph:
        return self.program.graph

    def param_node(self, name: str) -> fx.Node:
        for node in self.graph.nodes:
            if node.op == "placeholder" and self.placeholder_param.get(node.name) == name:
                return node
        raise KeyError(name)

    def input_node(self) -> fx.Node:
        return next(n for n in self.graph.nodes if n.op == "placeholder" and n.name not in self.placeholder_param)

    @property
    def streamed(self) -> bool:
        """The parameters are read from the checkpoint when asked (``awq_graph.weights.ParamStore``)."""
        return isinstance(self.params, StreamedParams)

    def param_shape(self, name: str) -> torch.Size:
        """A parameter's shape, without reading a streamed one."""
        return self.params.shape_of(name) if self.streamed else self.params[name].shape

    def param_makers(self, skip=()) -> dict[fx.Node, object]:
        """Placeholder -> a function reading its parameter (``run_nodes``' ``made``): a streamed
        parameter is read where the program first uses it and dropped after its last use."""
        return {node: (lambda name=name: self.params[name]) for node, name in self._placeholders() if node not in skip}

    def _placeholders(self):
        for node in self.graph.nodes:
            if node.op == "placeholder" and node.name in self.placeholder_param:
                yield node, self.placeholder_param[node.name]

    def param_of(self, node) -> str | None:
        """HF parameter name if ``node`` is a parameter placeholder."""
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return self.placeholder_param.get(node.name)
        return None

    def run(self, input_ids: torch.Tensor, overrides: dict[str, torch.Tensor] | None = None,
            fixed: dict[fx.Node, torch.Tensor] | None = None, made: dict[str, object] | None = None) -> torch.Tensor:
        """Logits of the whole graph, with parameters optionally replaced by name, and the
        values of some nodes optionally given (``fixed``: those nodes are not evaluated).
        ``made``: parameter name -> a function making its replacement, called just before the
        first node that reads it and dropped after the last (one replaced weight in memory at a
        time, not all of them)."""
        makers = {self.param_node(name): make for name, make in (made or {}).items()}
        env = {self.param_node(name): t for name, t in (overrides or {}).items()}
        # every other parameter read where it is used (a streamed one from the checkpoint)
        makers = {**self.param_makers(skip=set(env) | set(makers)), **makers}
        env[self.input_node()] = input_ids
        env.update(fixed or {})
        nodes = [n for n in self.graph.nodes if n.op == "call_function" and n not in (fixed or {})]
        out = next(n for n in self.graph.nodes if n.op == "output").args[0][0]
        env = run_nodes(nodes, env, made=makers, keep={out})
        return env[out]


def index_modules(gm: GraphModel) -> None:
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for path, cls in stack.values():
            path = path.removeprefix(PREFIX)
            name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
            gm.module_types.setdefault(path, name.rsplit(".", 1)[-1])
        site = linear_site(gm, node)
        if site is not None and site.module not in gm.linears:  # a module called twice is not a simple site
            gm.linears[site.module] = site


def linear_site(gm: GraphModel, node: fx.Node) -> LinearSite | None:
    if node.op != "call_function":
        return None
    aten = torch.ops.aten
    if node.target is aten.linear.default:
        x, w_node = node.args[0], node.args[1]
        b_node, transposed = (node.args[2] if len(node.args) > 2 else None), False
    elif node.target is aten.addmm.default and len(node.args) == 3 and not node.kwargs:
        b_node, x, w_node = node.args
        transposed = True
    elif _is_grouped_mm(node):
        return _experts_site(gm, node)
    elif node.target is aten.matmul.default and _transposed_param(gm, node.args[1]):
        x, w_node, b_node, transposed = node.args[0], node.args[1].args[0], None, False  # x @ W.T (Falcon)
    else:
        return None
    weight = gm.param_of(w_node)
    if weight is None or len(gm.param_shape(weight)) != 2:
        return None
    bias = gm.param_of(b_node) if isinstance(b_node, fx.Node) else None
    if isinstance(b_node, fx.Node) and bias is None:
        return None
    shape = gm.param_shape(weight)
    out_f, in_f = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
    return LinearSite(module_path(node), node, x, w_node, weight, bias, int(out_f), int(in_f), transposed)


def _transposed_param(gm: GraphModel, arg) -> bool:
    """True for ``W.T`` of a 2-D parameter W read only there (``x @ W.T`` is a linear over W)."""
    aten = torch.ops.aten
    if not (isinstance(arg, fx.Node) and arg.op == "call_function" and len(arg.users) == 1):
        return False
    t = arg.target
    swap = (t in (aten.numpy_T.default, aten.t.default)
            or (t is aten.transpose.int and tuple(d % 2 for d in arg.args[1:3]) in ((0, 1), (1, 0)))
            or (t is aten.permute.default and list(arg.args[1]) in ([1, 0], [-1, -2])))
    weight = gm.param_of(arg.args[0])
    return swap and weight is not None and len(gm.param_shape(weight)) == 2


def _is_grouped_mm(node: fx.Node) -> bool:
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and t.namespace == "transformers" and "grouped_mm" in t._opname


def _experts_site(gm: GraphModel, node: fx.Node) -> LinearSite | None:
    """grouped_mm(x, transpose(W[E, out, in], -2, -1), offsets) over a parameter bank W."""
    x, w_t = node.args[0], node.args[1]
    if not (isinstance(w_t, fx.Node) and w_t.target is torch.ops.aten.transpose.int
            and tuple(a % 3 for a in w_t.args[1:]) in ((1, 2), (2, 1))):
        return None
    weight = gm.param_of(w_t.args[0])
    if weight is None or len(gm.param_shape(weight)) != 3:
        return None
    experts, out_f, in_f = gm.param_shape(weight)
    return LinearSite(weight, node, x, w_t.args[0], weight, None, int(out_f), int(in_f), experts=int(experts))


class Steps:
    """A progress bar moved by calls, as a context: ``progress(iterable, desc, total)`` (the
    compile's, a bar on stderr; None: nothing) drives it, one step per ``step()``, for work that
    is not a loop of the caller's own, e.g. the parameters a run of the graph reads. On leaving,
    the bar ends at its total, or, when an error leaves, is taken down before the error is told."""

    def __init__(self, progress, desc: str, total: int):
        self._left = iter(progress(range(total), desc, total)) if progress and total else iter(())

    def __enter__(self) -> "Steps":
        next(self._left, None)  # the bar shows 0
        return self

    def step(self) -> None:
        next(self._left, None)

    def after(self, fn):
        """``fn``, moving the bar one step after each call."""
        def called(*args):
            value = fn(*args)
            self.step()
            return value
        return called

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            for _ in self._left:
                pass
        elif hasattr(self._left, "close"):  # a generator: its bar's own cleanup runs now
            self._left.close()


def run_nodes(nodes: list[fx.Node], env: dict[fx.Node, object], device=None,
              made: dict[fx.Node, object] | None = None, keep: set | None = None,
              swap: dict[fx.Node, object] | None = None) -> dict[fx.Node, object]:
    """The interpreter: evaluate ``call_function`` nodes in order over ``env`` (node -> value).

    Every node's inputs must already be in ``env``, or in ``made`` (node -> a function making
    its value, called before the first node that reads it); ``env`` is extended in place and
    returned. With ``keep`` given, every value but those is dropped after its last reader, so
    a made value (and the views of it) lives only while it is used. ``device``: where tensors
    the graph creates go (the export baked the CPU into their ``device`` argument); None leaves
    them as traced. ``swap``: node -> a function called instead of its target (same arguments).
    """
    def lookup(n: fx.Node):
        return env[n]

    made = made or {}
    last_reader = {}
    for node in nodes if keep is not None else ():
        for a in node.all_input_nodes:
            last_reader[a] = node
    for node in nodes:
        for a in node.all_input_nodes if made else ():  # the search's hot loop has none
            if a not in env and a in made:
                env[a] = made[a]()
        args = fx.node.map_arg(node.args, lookup)
        kwargs = fx.node.map_arg(node.kwargs, lookup)
        if device is not None and kwargs.get("device") is not None:
            kwargs = {**kwargs, "device": device}
        try:
            env[node] = (swap.get(node, node.target) if swap else node.target)(*args, **kwargs)
        except Exception as exc:
            raise InterpretError(f"node {node.name} ({node.target}) in {module_path(node) or 'top level'} failed: {exc}") from exc
        for a in node.all_input_nodes if keep is not None else ():
            if last_reader.get(a) is node and a not in keep:
                env.pop(a, None)
    return env
