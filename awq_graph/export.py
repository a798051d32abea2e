"""Export: torch.export of a causal LM (logits only, dynamic batch and sequence) -> ``GraphModel``."""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch._guards import detect_fake_mode
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .core.errors import ExportError, first_line
from .core.ir import PREFIX, GraphModel, index_modules
from .weights import ParamStore


class LogitsOnly(torch.nn.Module):
    """``input_ids -> logits``, without a KV cache, so that torch.export sees plain tensors."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits




def export_model(lm: torch.nn.Module, example_seq: int = 8, private: bool = True, skeleton=None,
                 seqlen: int | None = None) -> GraphModel:
    """torch.export with dynamic batch and sequence length -> GraphModel. ``private``: the
    program gets its own copies of the weights, so folding never edits ``lm``'s; False shares
    them (one copy of the weights less in memory, for a model nobody else holds).

    ``skeleton`` (``awq_graph.load.Skeleton``, ``lm`` being its model on the meta device): the
    graph is traced without any weights (meta input ids), the device the trace baked into the
    graph's tensor factories becomes the CPU, and the parameters are a ``ParamStore`` reading
    the checkpoint one tensor at a time.

    Export that does not give up: when the named dynamic dimensions fail (a constraint the
    modeling code puts on the length that our bounds contradict, a guard on the length), the
    export is retried with ``Dim.AUTO``, which lets torch keep each dimension dynamic where the
    code allows and fix it where it does not (a loop over positions unrolled, say). A length
    fixed that way is ``seqlen`` (the calibration's, so that the search runs on the graph; default
    ``example_seq``) and the GraphModel records it (``fixed_seq``): the analysis, the verification
    and the search then run at that length."""
    lm.eval()
    wrapper = LogitsOnly(lm)
    vocab = int(getattr(lm.config, "vocab_size", 2))
    context = int(getattr(lm.config, "max_position_embeddings", 8192) or 8192)

    def example_ids(seq):
        ids = torch.randint(0, max(vocab, 2), (2, seq), generator=torch.Generator().manual_seed(0))
        return ids.to("meta") if skeleton is not None else ids

    if skeleton is not None:
        private = False
    batch = torch.export.Dim("batch", max=4096)
    seq = torch.export.Dim("seq", min=2, max=context)
    auto = torch.export.Dim.AUTO
    attempts = [((example_ids(example_seq),), {"input_ids": {0: batch, 1: seq}}),
                ((example_ids(max(seqlen or example_seq, 2)),), {"input_ids": {0: auto, 1: auto}})]
    failures = []
    for example, dynamic in attempts:
        try:
            with torch.no_grad():
                program = torch.export.export(wrapper, example, dynamic_shapes=dynamic)
            break
        except Exception as exc:  # torch raises many kinds; the user needs one line
            failures.append(exc)
    else:
        exc = failures[0]
        raise ExportError(
            f"torch.export could not capture {type(lm).__name__}: {first_line(exc)} "
            "(awq-graph works on the exported graph, so `config` does not help here; a transformers "
            "release whose modeling code exports for this architecture may)"
        ) from exc
    ids_shape = input_shape(program)
    if is_concrete_int(ids_shape[0]):
        raise ExportError(f"torch.export of {type(lm).__name__} fixed the batch size to {int(ids_shape[0])}: "
                          "awq-graph needs a graph that runs any batch")
    fixed_seq = int(ids_shape[1]) if is_concrete_int(ids_shape[1]) else None
    sig = program.graph_signature
    # The program gets private copies of the tensors: folding edits them, never the caller's model.
    copies: dict[int, torch.Tensor] = {}

    def own(t: torch.Tensor) -> torch.Tensor:
        if not private:
            return t
        if id(t) not in copies:
            copy = t.detach().clone()
            copies[id(t)] = torch.nn.Parameter(copy, requires_grad=False) if isinstance(t, torch.nn.Parameter) else copy
        return copies[id(t)]

    for store in (program.state_dict, getattr(program, "constants", None) or {}):
        for name in list(store):
            if isinstance(store[name], torch.Tensor):
                store[name] = own(store[name])
    state = {**program.state_dict, **(getattr(program, "constants", None) or {})}
    placeholder_param = {}
    params = {}
    for ph, name in list(sig.inputs_to_parameters.items()) + list(sig.inputs_to_buffers.items()):
        hf = name.removeprefix(PREFIX)
        placeholder_param[ph] = hf
        params[hf] = state[name]
    for ph, name in getattr(sig, "inputs_to_lifted_tensor_constants", {}).items():
        placeholder_param[ph] = name
        params[name] = state[name]
    if skeleton is not None:
        params = _stream(program, params, skeleton)
    gm = GraphModel(program, params, placeholder_param, fixed_seq=fixed_seq)
    index_modules(gm)
    return gm


def input_shape(program: torch.export.ExportedProgram, index: int = 0) -> torch.Size:
    """The traced shape of the program's ``index``-th user input: each dimension an int or a
    SymInt; one the export specialized is a SymInt too, which ``is_concrete_int`` tells apart."""
    name = program.graph_signature.user_inputs[index]
    return next(n for n in program.graph.nodes if n.name == name).meta["val"].shape


def _stream(program, params: dict[str, torch.Tensor], skeleton) -> ParamStore:
    """The traced program made to run on the CPU, its parameters read from the checkpoint."""
    def cpu(a):
        return torch.device("cpu") if isinstance(a, torch.device) and a.type == "meta" else a

    for node in program.graph.nodes:
        if node.op == "call_function":
            node.args = tuple(cpu(a) for a in node.args)
            node.kwargs = {k: cpu(v) for k, v in node.kwargs.items()}
    _count_as_floats(program.graph)
    weights = set(skeleton.weights.names())
    fixed = {}
    for name, tensor in params.items():
        if tensor.device.type != "meta":
            fixed[name] = tensor  # a buffer (rotary frequencies) the skeleton computed
        elif skeleton.aliases.get(name, name) not in weights:
            raise StreamingUnsupported(f"the traced graph reads '{name}', which the checkpoint does not hold")
    return ParamStore(skeleton.weights, {name: t.shape for name, t in params.items()}, skeleton.aliases, fixed)


def _count_as_floats(graph: torch.fx.Graph) -> int:
    """Modeling code that branches on the device took, traced on the meta device, the branch
    for accelerators: transformers' MoE experts count the tokens per expert with ``histc`` of
    integers, which the CPU has no kernel for (its CPU branch counts the same ids as floats).
    Each such ``histc`` gets its input cast to float32, as that branch does. Returns how many."""
    cast = 0
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten.histc.default:
            continue
        ids = node.args[0]
        val = ids.meta.get("val")
        if val is None or val.is_floating_point():
            continue
        with graph.inserting_before(node):
            floats = graph.call_function(torch.ops.aten._to_copy.default, (ids,), {"dtype": torch.float32})
        floats.meta = {key: value for key, value in node.meta.items() if key != "val"}
        with (detect_fake_mode([val]) or nullcontext()):
            floats.meta["val"] = val.to(torch.float32)
        node.args = (floats, *node.args[1:])
        cast += 1
    return cast


class StreamingUnsupported(ExportError):
    """This checkpoint cannot be compiled one tensor at a time (the pipeline loads it whole)."""
