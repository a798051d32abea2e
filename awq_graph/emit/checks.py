"""The checks a written graph passes before compile keeps it: onnxruntime runs the file as
written against the torch program with the same dequantized weights, and the integers in the file
are compared with the search's digests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from awq_graph.core.analysis import token_lookup, token_table
from awq_graph.core.ir import GraphModel
from awq_graph.core.numerics import QuantizedWeight
from awq_graph.core.spill import SpilledWeight, digest
from awq_graph.core.layer_cut import LayerCut, run_layers
from awq_graph.head_table import TokenTable

# Relative logit error allowed: with float32 activations a graph computes what the torch program
# does to float32 rounding, so a tight bound catches a wrong structure; int8 activations (accuracy
# level 4) and float16 round visibly, more with depth and where MoE routing flips to other experts,
# while a wrong graph is off by O(1).
FLOAT_TOLERANCE = 1e-3
INT8_TOLERANCE = 0.25
FLOAT16_TOLERANCE = 5e-2  # float16 activations, or 8-bit QMoE experts (int8 activations at every level)


def remove_written(path: Path) -> None:
    """A graph that failed its check: ``path`` and its data file go, so nothing wrong is left."""
    for written in path.parent.glob(path.name + "*"):
        written.unlink()


def check_logits_only(path: Path, gm: GraphModel, quantized, accuracy_level: int, tokens: int = 12,
                      seed: int = 0) -> float:
    """||onnx - torch|| / ||torch|| over the logits of ``tokens`` random ids (the length the
    export fixed, if it did) through the logits-only graph at ``path``."""
    from awq_graph.runtime import CompiledModel

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, gm.param_shape(token_table(gm))[0], (1, gm.fixed_seq or tokens), generator=gen)
    with torch.no_grad():
        ref = gm.run(ids, made=fake_quant_makers(gm, quantized)).float().numpy()
    got = CompiledModel(path, threads=1, prepack=accuracy_level != 0).logits(ids.numpy()).numpy()
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))


def generic_check_tokens(model, tokens: int = 12, longest: int = 128) -> int:
    """The prefill length of the generic decoder's check: past a sliding window when the window
    is short enough to run (so the steps after it attend through the window's mask), else 12."""
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    return window + 2 if isinstance(window, int) and tokens <= window + 2 <= longest else tokens


def checked_layers(gm: GraphModel, model) -> list[int]:
    """The decoder layers the check runs: the first two, the last, and the first of each kind of
    attention (gemma's local and global layers); every layer of a model whose layers are not one
    program (a dense first layer before MoE ones)."""
    stages = LayerCut(gm)
    n = stages.n
    kinds = list(getattr(getattr(model, "config", None), "layer_types", None) or [])[:n]
    chosen = sorted({0, min(1, n - 1), n - 1} | {kinds.index(k) for k in set(kinds)})
    return chosen if all(stages.alike(0, i) for i in chosen) else list(range(n))


def over_written_tensors(model: ir.Model, path: Path) -> ir.Model:
    """``model`` with each initializer replaced by the tensor of the same name in the written
    model at ``path`` (read from its data file only when run): the check runs the bytes the
    user gets, and nothing is written or held twice."""
    written = ir.load(path).graph.initializers
    for name, value in model.graph.initializers.items():
        source = written.get(name)
        if source is None or source.const_value.shape != value.const_value.shape or \
                source.const_value.dtype != value.const_value.dtype:
            raise RuntimeError(f"awq-graph bug: the checked graph's initializer '{name}' is not in {path.name} as built")
        value.const_value = source.const_value
    return model


def check_written_integers(model_path: Path, written: dict[str, tuple[str, SpilledWeight]]) -> int:
    """Compare the bytes of each written initializer (name -> (array kind, its integers)) in the
    model's external data with the digests the search recorded, segment by segment: a fused
    tensor's rows are its linears' rows in order, so its bytes split at their lengths. Reads one
    tensor at a time. Returns how many linears were compared; raises on the first mismatch."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    checked = set()
    for tensor in proto.graph.initializer:
        if tensor.name not in written:
            continue
        kind, spilled = written[tensor.name]
        info = {e.key: e.value for e in tensor.external_data}
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        if "location" in info:
            with open(Path(model_path).parent / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                data = f.read(int(info["length"]))
        else:  # a small tensor in the model file itself
            data = tensor.raw_data
        start = 0
        for seg in spilled.segments:
            size = int(np.prod(seg.where[kind][2])) * itemsize
            key = "scales16" if kind == "scales" and itemsize == 2 else kind
            if digest(data[start:start + size]) != seg.digests[key]:
                raise RuntimeError(f"awq-graph bug: the {kind} of '{seg.linear}' in {Path(model_path).name}'s "
                                   f"initializer '{tensor.name}' are not what the search chose")
            start += size
            checked.add(seg.linear)
        if start != len(data):
            raise RuntimeError(f"awq-graph bug: initializer '{tensor.name}' holds {len(data)} bytes, its linears {start}")
        del data
    missing = sorted(set(written) - {t.name for t in proto.graph.initializer})
    if missing:
        raise RuntimeError(f"awq-graph bug: the written model lacks the initializer '{missing[0]}'")
    return len(checked)


def fake_quant_overrides(gm: GraphModel, quantized: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """Parameter name -> dequantized weight in the parameter's layout: the torch reference."""
    return {name: make() for name, make in fake_quant_makers(gm, quantized).items()}


def fake_quant_makers(gm: GraphModel, quantized: dict[str, QuantizedWeight]) -> dict[str, object]:
    """Parameter name -> a function making its dequantized weight (``GraphModel.run``'s ``made``:
    one dequantized weight in memory at a time)."""
    def maker(name):
        site, q = gm.linears[name], quantized[name]
        return lambda: site.stored(q.dequantize())
    return {gm.linears[n].weight: maker(n) for n in quantized}


def check_decoder(graphs: dict[int, Path], gm: GraphModel, quantized, quantized_table: TokenTable | None,
                  layers: list[int] | None = None, tokens: int = 12, decode_steps: int = 3,
                  seed: int = 0) -> dict[int, float]:
    """Per decoder file (by its accuracy level), ||onnx - torch|| / ||torch|| over the logits of a
    prefill of ``tokens`` random ids followed by ``decode_steps`` one-token steps against the
    cache; the torch reference (the program run through ``layers``, None: all) is computed once."""
    from awq_graph.runtime import CompiledModel

    lookup = token_lookup(gm)
    table_name = gm.param_of(lookup.args[0])
    gen = torch.Generator().manual_seed(seed)
    if gm.fixed_seq:  # the torch program runs only at the length its export fixed
        tokens = gm.fixed_seq - decode_steps
    ids = torch.randint(0, gm.param_shape(table_name)[0], (1, tokens + decode_steps), generator=gen)
    fixed = {}
    if quantized_table is not None:  # the lookup reads an int4 copy of the table (tied or not)
        fixed[lookup] = quantized_table.rows(ids)
    with torch.no_grad():  # each dequantized weight made where it is read, then dropped
        made = fake_quant_makers(gm, quantized)
        ref = (gm.run(ids, fixed=fixed, made=made) if layers is None else
               run_layers(gm, ids, layers, made=made, fixed=fixed)).float().numpy()
    deviations = {}
    for level, path in graphs.items():
        # Float activations need no prepacked copies (the head of an 8B model would be held twice,
        # 2.1 GB of float32); int8 activations do: without prepacking MatMulNBits computes in float
        # whatever its level (measured: the same deviation at levels 0 and 4).
        got = CompiledModel(path, threads=1, prepack=level != 0).logits_with_cache(ids.numpy(), prefill=tokens)
        deviations[level] = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))
    return deviations
