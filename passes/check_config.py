"""Match: derive the per-layer scaling groups from the graph, or check a user's Quark config.

``derive_groups`` runs the channel flow over every decoder layer's linears.
``resolve_config`` instantiates a Quark template for every decoder layer and checks each
entry against the graph; each fault is a string that starts with the config path
(``scaling_layers[3]: ...``) and says the graph reason.
"""
from __future__ import annotations

from awq_graph.core.analysis import ancestors, decoder_layers, example_values, layer_linears
from awq_graph.core.ir import GraphModel, module_path
from awq_graph.core.records import ScalingGroup, common_module
from awq_graph.passes.channel_flow import COMMUTING, Stop, find_groups, op_name, resolve_members, trace_up


def derive_groups(gm: GraphModel, example=None):
    """Groups and skipped sources of every decoder layer, layer by layer, in graph order."""
    prefix, n = decoder_layers(gm)
    example = example if example is not None else example_values(gm)
    per_layer, skipped = [], []
    for i in range(n):
        groups, skip = find_groups(gm, layer_linears(gm, prefix, i), example)
        per_layer.append(groups)
        skipped.extend(skip)
    return prefix, per_layer, skipped


def resolve_config(gm: GraphModel, cfg: dict, example=None):
    """Instantiate a Quark AWQ template per decoder layer -> (per-layer groups, faults)."""
    example = example if example is not None else example_values(gm)
    prefix = cfg["model_decoder_layers"]
    n = 0
    while f"{prefix}.{n}" in gm.module_types:
        n += 1
    if n == 0:
        return [], [f"model_decoder_layers: '{prefix}' names no module list in the graph "
                    f"(found e.g. {sorted(gm.module_types)[1:4]})"]
    faults: list[str] = []
    per_layer: list[list[ScalingGroup]] = []
    for i in range(n):
        groups = []
        base = f"{prefix}.{i}"
        for k, entry in enumerate(cfg["scaling_layers"]):
            where = f"scaling_layers[{k}]"
            prev = f"{base}.{entry['prev_op']}"
            layers = [f"{base}.{x}" for x in entry["layers"]]
            fault = None
            if prev not in gm.module_types:
                fault = f"{where}: prev_op '{entry['prev_op']}' is not a module of {base}"
            for rel, path in zip(entry["layers"], layers):
                if fault is None and path not in gm.linears:
                    fault = (f"{where}: layer '{rel}' is not a module of {base}" if path not in gm.module_types
                             else f"{where}: layer '{rel}' is not a linear layer")
            if fault is None and f"{base}.{entry['inp']}" not in gm.module_types:
                fault = f"{where}: inp '{entry['inp']}' is not a module of {base}"
            inspect = entry.get("module2inspect")
            if fault is None and inspect and f"{base}.{inspect}" not in gm.module_types:
                fault = f"{where}: module2inspect '{inspect}' is not a module of {base}"
            if fault is None and inspect and not all(
                    p == f"{base}.{inspect}" or p.startswith(f"{base}.{inspect}.") for p in layers):
                fault = f"{where}: module2inspect '{inspect}' does not contain all of its layers"
            members = []
            source = None
            if fault is None:
                for rel, path in zip(entry["layers"], layers):
                    tr = trace_up(gm, gm.linears[path].input, example)
                    if isinstance(tr, Stop):
                        culprit = module_path(tr.node) or tr.node.name
                        fault = (f"{where}: prev_op '{entry['prev_op']}' reaches '{rel}' only through "
                                 f"'{_rel(culprit, base)}' ({op_name(tr.node)}), which does not commute with scaling")
                        break
                    if tr.source.module != prev:
                        culprit = _blocking_op(gm, prev, gm.linears[path].input)
                        fault = (f"{where}: prev_op '{entry['prev_op']}' reaches '{rel}' only through "
                                 f"'{_rel(module_path(culprit), base)}' ({op_name(culprit)}), which does not "
                                 f"commute with scaling" if culprit is not None else
                                 f"{where}: layer '{rel}' does not read prev_op '{entry['prev_op']}': its input "
                                 f"scales back to '{_rel(tr.source.module, base)}'")
                        break
                    source = tr.source
                    members.append((path, tr))
            if fault is None:
                maps, reason = resolve_members(gm, source, members, example)
                if reason:
                    fault = f"{where}: {reason.replace(base + '.', '')}"
            if fault is None:
                groups.append(ScalingGroup.build(
                    source.module, source.kind, source.params, source.channels, layers, maps,
                    # Quark may name a container as inp; the statistics are taken at a layer's input
                    inp=(f"{base}.{entry['inp']}" if f"{base}.{entry['inp']}" in layers else layers[0]),
                    module2inspect=f"{base}.{inspect}" if inspect else common_module(layers)))
            elif fault not in faults:
                faults.append(fault if i == 0 else f"{fault} (layer {i})")
        per_layer.append(groups)
    return per_layer, faults


def _blocking_op(gm: GraphModel, prev: str, start):
    """First op on the paths from ``prev``'s output to ``start`` that no rule lets a scale through."""
    nodes = list(gm.graph.nodes)
    outs = [n for n in nodes if module_path(n) == prev or module_path(n).startswith(prev + ".")]
    if not outs:
        return None
    inside = set(outs)
    frontier = {u for n in outs for u in n.users if u not in inside}
    between, stack = set(), list(frontier)
    upstream = ancestors(start)
    while stack:
        n = stack.pop()
        if n in between or n not in upstream:
            continue
        between.add(n)
        stack.extend(n.users)
    for n in nodes:
        if n in between and n.op == "call_function" and n.target not in COMMUTING:
            return n
    return None


def _rel(path: str, base: str) -> str:
    return path[len(base) + 1:] if path.startswith(base + ".") else path
