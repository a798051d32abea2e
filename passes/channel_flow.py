"""Channel dataflow: which ``prev_op -> layers`` pairs can carry a positive per-channel scale.

The rewrite we want to make exact: for a source tensor ``y`` (a fold point's output, C
channels on its last dim) and positive ``s`` in R^C,

    y' = y * diag(1/s)                      (folded into the source's parameters)
    W_i' = W_i * diag(s[map_i])             (folded into every consumer linear's columns)

leaves the float function unchanged iff every path from ``y`` to a consumer commutes with a
per-channel scale, and every consumer of those paths is one of the compensated linears.

Rules (each op below commutes with ``x -> x * s`` on its carried operand):
  1. data movement (view, reshape, transpose, permute, expand, slice, split, cat, select,
     index_select, clone, alias, casts): channels move, values do not; the channel map
     follows by running the op on a tensor of channel indices ("tags").
  2. elementwise mul/div by a tensor that does not depend on ``y``: (s x) * z = s (x z).
  3. positively homogeneous maps: relu(s x) = s relu(x), leaky_relu, dropout (eval), neg.
  4. attention's value path: softmax(QK^T) (s V) = s (softmax(QK^T) V), channel d of V
     goes to channel d of the output, per head (repeated per group for enable_gqa).
     Also ``P @ V`` (eager attention) with V as the right operand.
Fold points (where ``1/s`` goes): any per-channel affine op whose parameters only it reads,
found by the op and the parameters' shapes, whatever the parameters are called, behind casts
(a norm computed in float32):
  A. a norm's affine weight: ``x_hat * w`` with w a 1-D parameter -> w / s.
  A+. the same with a bias, ``x_hat * w + b``                -> w / s, b / s.
  B. a norm written ``x_hat * (1 + w)``                       -> w' = (1 + w) / s - 1.
  B+. the same with a bias, ``x_hat * (1 + w) + b``          -> w', b / s.
  C. aten.layer_norm weight (and bias)                        -> weight / s, bias / s.
  C1. aten.layer_norm with weight ``1 + w`` (Nemotron's LayerNorm1P), with or without a bias
                                                              -> w', b / s.
  D. a linear's output rows (and bias) -> W[j, :] / s_j, b_j / s_j.
Anything else ends the walk (silu, gelu, softmax input, residual add, rope on q/k, a norm
without parameters, ...).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from awq_graph.core.analysis import example_values, real_users
from awq_graph.core.ir import GraphModel, linear_site, module_path
from awq_graph.core.records import FoldKind, ScalingGroup, SkippedGroup

aten = torch.ops.aten

# Rule 1: pure data movement, carried operand is args[0].
MOVEMENT = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.expand.default, aten.slice.Tensor, aten.select.int, aten.narrow.default,
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.repeat.default, aten.split.Tensor, aten.split_with_sizes.default,
    aten.chunk.default, aten.unbind.int, aten.index_select.default, aten.repeat_interleave.self_int,
    aten.movedim.int, aten.detach.default, operator.getitem,
    aten.index.Tensor,  # a gather (MoE: the tokens routed to the experts); tags give the channel map
}


@dataclass(frozen=True)
class FoldPoint:
    kind: FoldKind
    module: str
    node: fx.Node  # the node whose output is the scaled tensor
    params: tuple[str, ...]  # parameter names the fold edits
    channels: int


@dataclass
class Trace:
    source: FoldPoint
    path: list[fx.Node]  # from just after the source to the linear's input, in graph order
    carriers: dict[fx.Node, fx.Node]  # path node -> the operand that carries the channels


@dataclass
class Stop:
    node: fx.Node
    reason: str


@dataclass(frozen=True)
class OpRule:
    """How a per-channel scale passes one kind of op (rules 1-4 above), both ways:
    ``carrier(gm, node, example)`` is the operand that carries the scaled channels, walking up
    from a linear (or the Stop that ends the walk); ``tags(node, tag, carrier, example)`` the
    channel tags of the op's output from its carrier's, walking back down."""

    ops: frozenset
    carrier: Callable
    tags: Callable


def _first_operand(gm: GraphModel, node: fx.Node, example: dict) -> fx.Node | Stop:
    carried = node.args[0]
    if isinstance(carried, (list, tuple)):
        return Stop(node, f"{node.name} ({op_name(node)}) has several inputs")
    return carried


def _the_one_scalable_input(gm: GraphModel, node: fx.Node, example: dict) -> fx.Node | Stop:
    """cat: of its inputs exactly one may trace to a fold point."""
    sources = [a for a in node.args[0] if isinstance(a, fx.Node)]
    ok = [a for a in sources if isinstance(trace_up(gm, a, example), Trace)]
    if len(ok) != 1:
        return Stop(node, f"{node.name} (cat) joins {len(ok)} scalable inputs; one is needed")
    return ok[0]


def _the_scalable_factor(gm: GraphModel, node: fx.Node, example: dict) -> fx.Node | Stop:
    """mul: either operand, div: the dividend; the other must not depend on the source."""
    candidates = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if node.target is aten.div.Tensor:
        candidates = candidates[:1]
    found = [(a, trace_up(gm, a, example)) for a in candidates]
    ok = [a for a, trace in found if isinstance(trace, Trace)]
    if len(ok) == 1:
        return ok[0]
    if not ok:
        reasons = "; ".join(trace.reason for _, trace in found if isinstance(trace, Stop))
        return Stop(node, reasons or f"{node.name} (mul) has no scalable operand")
    return Stop(node, f"{node.name} ({op_name(node)}) multiplies two scalable tensors")


def _op_on_tags(node: fx.Node, tag: torch.Tensor, carrier: fx.Node, example: dict) -> torch.Tensor:
    """The op itself, run on the tensor of channel indices in the carrier's place."""
    def sub(a):
        return tag if a is carrier else example[a]
    return node.target(*fx.node.map_arg(node.args, sub), **fx.node.map_arg(node.kwargs, sub))


def _same_tags(node: fx.Node, tag: torch.Tensor, carrier: fx.Node, example: dict) -> torch.Tensor:
    return tag


def _tags_laid_out(node: fx.Node, tag: torch.Tensor, carrier: fx.Node, example: dict) -> torch.Tensor:
    return _laid_out_like(tag, example[node])


def _value_path_tags(node: fx.Node, tag: torch.Tensor, carrier: fx.Node, example: dict) -> torch.Tensor:
    """Rule 4: out[..., i, d] mixes v[..., j, d] over j: channel d per head."""
    first = tag[..., :1, :]
    if not torch.equal(tag, first.expand_as(tag)):
        raise _Inconsistent(node)
    res = example[node]
    if node.target is aten.scaled_dot_product_attention.default and first.shape[-3] != res.shape[-3]:  # enable_gqa
        first = first.repeat_interleave(res.shape[-3] // first.shape[-3], dim=-3)
    return _laid_out_like(first, res)


CASTS = frozenset({aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default,
                   aten.lift_fresh_copy.default})
RULES = (
    OpRule(frozenset(MOVEMENT), _first_operand, _op_on_tags),  # rule 1
    OpRule(frozenset({aten.cat.default}), _the_one_scalable_input, _op_on_tags),  # rule 1, one scalable input
    OpRule(CASTS, _first_operand, _same_tags),  # casts move no channels: tags kept (a cast to bf16 would round them)
    OpRule(frozenset({aten.relu.default, aten.leaky_relu.default, aten.dropout.default, aten.neg.default,
                      aten.mul.Scalar, aten.div.Scalar}), _first_operand, _same_tags),  # rule 3
    OpRule(frozenset({aten.mul.Tensor, aten.div.Tensor}), _the_scalable_factor, _tags_laid_out),  # rule 2
    OpRule(frozenset({aten.scaled_dot_product_attention.default}), lambda gm, node, example: node.args[2],
           _value_path_tags),  # rule 4: V is the third operand
    OpRule(frozenset({aten.matmul.default, aten.bmm.default}), lambda gm, node, example: node.args[1],
           _value_path_tags),  # rule 4: P @ V
)
RULE_OF = {op: rule for rule in RULES for op in rule.ops}
COMMUTING = frozenset(RULE_OF)  # every op some rule may let a scale through


def op_name(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", str(t)).split(".")[0]


def param_through_casts(gm: GraphModel, arg) -> tuple[str | None, bool]:
    """(parameter name, used only here) for ``arg`` = a parameter behind zero or more casts."""
    private = True
    while isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target in CASTS:
        private = private and len(real_users(arg)) == 1
        arg = arg.args[0]
    name = gm.param_of(arg)
    if name is None:
        return None, False
    return name, private and len(real_users(arg)) == 1


def _single_use_param(gm: GraphModel, arg) -> str | None:
    name, private = param_through_casts(gm, arg)
    return name if private else None


def fold_point(gm: GraphModel, node: fx.Node, example: dict) -> FoldPoint | Stop | None:
    """Cases A-D of the module docstring, or None if ``node`` is not a fold point."""
    if node.op != "call_function":
        return None
    t = node.target
    site = linear_site(gm, node)
    if site is not None:  # Case D
        w = _single_use_param(gm, site.weight_node)
        if w is None:
            return Stop(node, f"'{site.module}' shares its weight with another op (tied weights)")
        params = [w]
        if site.bias is not None:
            b = _single_use_param(gm, node.args[0] if site.transposed else node.args[2])
            if b is None:
                return Stop(node, f"'{site.module}' has a bias that is not a private parameter")
            params.append(b)
        kind = FoldKind.LINEAR_T if site.transposed else FoldKind.LINEAR
        return FoldPoint(kind, site.module, node, tuple(params), site.out_features)
    if t is aten.layer_norm.default and len(node.args) > 2 and node.args[2] is not None:  # Cases C, C1
        return _layer_norm_point(gm, node)
    if t is aten.add.Tensor:  # Cases A+, B+
        return _biased_norm_point(gm, node, example)
    if t is aten.mul.Tensor:
        out = example.get(node)
        if not isinstance(out, torch.Tensor):
            return None

        def channel_vector(name):
            return name is not None and len(gm.param_shape(name)) == 1 and gm.param_shape(name)[0] == out.shape[-1]

        for i, a in enumerate(node.args[:2]):
            other = node.args[1 - i]
            if not isinstance(other, fx.Node):
                continue
            name, private = param_through_casts(gm, a)
            if channel_vector(name):
                if not private:
                    return Stop(node, f"parameter '{name}' is used elsewhere too")
                return FoldPoint(FoldKind.NORM_WEIGHT, module_path(node), node, (name,), out.shape[-1])  # Case A
            name, private = _one_plus_param(gm, a)
            if channel_vector(name):
                if not private:
                    return Stop(node, f"parameter '{name}' is used elsewhere too")
                return FoldPoint(FoldKind.NORM_OFFSET, module_path(node), node, (name,), out.shape[-1])  # Case B
    return None


def _one_plus_param(gm: GraphModel, arg) -> tuple[str | None, bool]:
    """(parameter name, used only here) for ``arg`` = ``1 + w`` or ``w + 1``, w a parameter
    behind zero or more casts; (None, False) otherwise."""
    if not (isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target is aten.add.Tensor
            and len(real_users(arg)) == 1):
        return None, False
    p, c = arg.args[0], arg.args[1]
    if isinstance(c, fx.Node):
        p, c = c, p
    if isinstance(c, fx.Node) or c != 1 or arg.kwargs.get("alpha", 1) != 1:
        return None, False
    return param_through_casts(gm, p)


def _layer_norm_point(gm: GraphModel, node: fx.Node) -> FoldPoint | Stop | None:
    """Case C (weight and bias parameters) or C1 (weight ``1 + w``) of aten.layer_norm."""
    weight, bias = node.args[2], node.args[3] if len(node.args) > 3 else None
    name, private = param_through_casts(gm, weight)
    kind = FoldKind.LAYER_NORM
    if name is None:
        name, private = _one_plus_param(gm, weight)
        kind = FoldKind.NORM_OFFSET
    if name is None:
        return None
    params = [(name, private)] + ([param_through_casts(gm, bias)] if bias is not None else [])
    if any(p is None or not ok for p, ok in params):
        return Stop(node, f"'{module_path(node)}' shares its affine parameters")
    return FoldPoint(kind, module_path(node), node, tuple(p for p, _ in params), int(gm.param_shape(name)[0]))


def _biased_norm_point(gm: GraphModel, node: fx.Node, example: dict) -> FoldPoint | Stop | None:
    """``x_hat * w + b`` or ``x_hat * (1 + w) + b``: Case A or B, then a bias of the same channels
    that only this add reads; the product must have no other reader (it is scaled too)."""
    for i, a in enumerate(node.args[:2]):
        if not (isinstance(a, fx.Node) and a.target is aten.mul.Tensor and len(real_users(a)) == 1):
            continue
        inner = fold_point(gm, a, example)
        if not (isinstance(inner, FoldPoint) and inner.kind in (FoldKind.NORM_WEIGHT, FoldKind.NORM_OFFSET)):
            continue
        bias, private = param_through_casts(gm, node.args[1 - i])
        if bias is None or tuple(gm.param_shape(bias)) != (inner.channels,):
            continue
        if not private:
            return Stop(node, f"parameter '{bias}' is used elsewhere too")
        return FoldPoint(inner.kind, inner.module, node, inner.params + (bias,), inner.channels)
    return None


def norm_offsets(gm: GraphModel) -> dict[str, float]:
    """Every norm weight of the graph (a fold point of Case A or B) -> the constant its norm adds
    to it before multiplying: 0 for ``x * w``, 1 for ``x * (1 + w)``. Read off the graph (shapes
    from the export's metadata), whether or not the norm feeds a scaling group."""
    shapes = {node: node.meta.get("val") for node in gm.graph.nodes}
    offsets = {}
    for node in gm.graph.nodes:
        if node.target in (aten.mul.Tensor, aten.layer_norm.default):
            point = fold_point(gm, node, shapes)
            if isinstance(point, FoldPoint) and point.kind in (FoldKind.NORM_WEIGHT, FoldKind.NORM_OFFSET):
                offsets[point.params[0]] = point.kind.norm_offset
    return offsets


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n))
    return found


def trace_up(gm: GraphModel, start: fx.Node, example: dict) -> Trace | Stop:
    """Walk from a linear's input toward the nearest fold point through rules 1-4."""
    path: list[fx.Node] = []
    carriers: dict[fx.Node, fx.Node] = {}
    cur = start
    while True:
        fp = fold_point(gm, cur, example)
        if isinstance(fp, FoldPoint):
            path.reverse()
            return Trace(fp, path, carriers)
        if isinstance(fp, Stop):
            return fp
        if cur.op != "call_function":
            return Stop(cur, f"'{cur.name}' is a graph input")
        rule = RULE_OF.get(cur.target)
        if rule is None:
            return Stop(cur, f"'{module_path(cur) or cur.name}' reaches it only through {cur.name} "
                             f"({op_name(cur)}), which does not commute with scaling")
        nxt = rule.carrier(gm, cur, example)
        if isinstance(nxt, Stop):
            return nxt
        path.append(cur)
        carriers[cur] = nxt
        cur = nxt


def propagate_tags(source: FoldPoint, path: list[fx.Node], carriers: dict, example: dict) -> dict:
    """Run the path on channel-index tensors: tags[n][..., c] = source channel feeding n[..., c]."""
    out = example[source.node]
    tag0 = torch.arange(source.channels, dtype=torch.float64).expand(out.shape).contiguous()
    tags = {source.node: tag0}
    for node in path:
        carrier = carriers[node]
        tags[node] = RULE_OF[node.target].tags(node, tags[carrier], carrier, example)
    return tags


def _laid_out_like(tag: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``tag`` broadcast to ``value``'s shape, in a tensor of ``value``'s strides: the views that
    follow in the graph were traced on that layout (afmoe views its attention's transposed output)."""
    out = torch.empty_strided(value.shape, value.stride(), dtype=tag.dtype)
    return out.copy_(torch.broadcast_to(tag, value.shape))


class _Inconsistent(Exception):
    def __init__(self, node):
        self.node = node


def find_groups(gm: GraphModel, linears: list[str] | None = None, example: dict | None = None,
                shared_weights: bool = False):
    """All valid scaling groups among ``linears`` (default: every linear with a parameter weight).
    ``shared_weights``: a layer's weight may be read by other ops too (a head tied to the token
    table), for a fold that scales a copy of the layers' weights and edits only the source.

    Returns (groups, skipped): ScalingGroup records in graph order, and SkippedGroup records
    that say why a source found by the walk could not carry a scale.
    """
    example = example if example is not None else example_values(gm)
    names = linears if linears is not None else list(gm.linears)
    traces: dict[fx.Node, list[tuple[str, Trace]]] = {}
    unreached: list[SkippedGroup] = []
    for name in names:
        site = gm.linears[name]
        tr = trace_up(gm, site.input, example)
        if isinstance(tr, Trace):
            traces.setdefault(tr.source.node, []).append((name, tr))
        else:
            unreached.append(SkippedGroup("", (name,), tr.reason))
    groups, skipped = [], unreached
    for src_node, members in traces.items():
        source = members[0][1].source
        layer_names = [m for m, _ in members]
        maps, reason = resolve_members(gm, source, members, example, shared_weights)
        if reason:
            skipped.append(SkippedGroup(source.module, tuple(layer_names), reason))
            continue
        groups.append(ScalingGroup.build(source.module, source.kind, source.params, source.channels,
                                         layer_names, maps))
    return groups, skipped


def resolve_members(gm: GraphModel, source: FoldPoint, members, example, shared_weights: bool = False):
    """Channel maps of a candidate group and its soundness check -> (maps, None) or (None, reason)."""
    maps, tags = {}, {}
    try:
        for name, tr in members:
            t = propagate_tags(source, tr.path, tr.carriers, example)
            tags.update(t)
            maps[name] = _channel_map(t[tr.path[-1]] if tr.path else t[source.node], name)
    except _Inconsistent as exc:
        return None, f"channels do not stay aligned through {exc.node.name}"
    except ValueError as exc:
        return None, str(exc)
    used = {c for m in maps.values() for c in m}
    reason = _check_consumers(gm, source, members, tags, used, example, shared_weights)
    return (None, reason) if reason else (maps, None)


def _check_consumers(gm: GraphModel, source: FoldPoint, members, tags, used, example,
                     shared_weights: bool = False) -> str | None:
    """Every consumer of the scaled channels must be compensated (soundness rule).

    Channels of the source that reach no layer of the group keep s = 1, so an op that reads
    only those (the gate half of a fused gate_up projection) needs no compensation.
    """
    on_path = {source.node}
    for _, tr in members:
        on_path.update(tr.path)
    layer_inputs = {gm.linears[name].node: name for name, _ in members}
    for node in on_path:
        for user in real_users(node):
            if user in on_path:
                continue
            if user in layer_inputs and gm.linears[layer_inputs[user]].input is node:
                continue
            if _reads_only_unscaled(user, node, tags, used, example):
                continue
            what = module_path(user) or user.name
            if linear_site(gm, user) is not None:
                return f"'{what}' also reads the scaled tensor but is not compensated"
            return f"the scaled tensor also flows into {user.name} ({op_name(user)}) in '{what}', which cannot be compensated"
    # Rules 2 and 4 need the other operand free of scaled channels. Every way a scaled
    # channel leaves the path was checked above, so it suffices that the other operand is
    # not itself on the path (x * x, or q/k computed from the scaled tensor).
    for _, tr in members:
        for node in tr.path:
            operands = _tensor_args(node)
            carrier = tr.carriers[node]
            if operands.count(carrier) > 1 or any(o in on_path for o in operands if o is not carrier):
                return f"{node.name} ({op_name(node)}) combines the scaled tensor with itself"
    for name, _ in members:
        if not shared_weights and len(real_users(gm.linears[name].weight_node)) != 1:
            return f"'{name}' shares its weight with another op (tied weights)"
    return None


def _reads_only_unscaled(user: fx.Node, node: fx.Node, tags, used, example) -> bool:
    """True when ``user`` moves data out of ``node`` and none of it is a scaled channel."""
    if user.target not in MOVEMENT or user.args[0] is not node or node not in tags:
        return False
    try:
        args = fx.node.map_arg(user.args, lambda a: tags[node] if a is node else example[a])
        kwargs = fx.node.map_arg(user.kwargs, lambda a: example[a])
        moved = user.target(*args, **kwargs)
    except Exception:
        return False
    parts = moved if isinstance(moved, (list, tuple)) else [moved]
    if isinstance(moved, (list, tuple)):  # a split: only its items that some user reads
        read = {u.args[1] for u in real_users(user) if u.target is operator.getitem}
        parts = [p for i, p in enumerate(parts) if i in read]
    return all(not (set(torch.unique(p).long().tolist()) & used) for p in parts)


def _channel_map(tag: torch.Tensor, layer: str) -> list[int]:
    rows = tag.reshape(-1, tag.shape[-1])
    if not torch.equal(rows, rows[:1].expand_as(rows)):
        raise ValueError(f"the input channels of '{layer}' do not map to fixed source channels")
    return [int(v) for v in rows[0].tolist()]
