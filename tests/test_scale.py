"""Checkpoints of real shapes for the scale work: tools/random_checkpoint.py writes sharded bf16
safetensors tensor by tensor; transformers loads them as written, and compile takes them."""
import json
import sys

import torch

from conftest import REPO, tiny_tokenizer

sys.path.insert(0, str(REPO / "tools"))
from random_checkpoint import build, llama_config, tensor_shapes  # noqa: E402


def test_a_sharded_bf16_checkpoint_written_tensor_by_tensor_loads_as_written(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    folder = build(tmp_path / "ck", "tiny", layers=3, shard_bytes=40_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and set(index["weight_map"]) == set(tensor_shapes(llama_config("tiny", 3)))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    for shard in shards:
        with safe_open(folder / shard, "pt") as f:
            for name in f.keys():
                stored = f.get_tensor(name)
                assert stored.dtype == torch.bfloat16 and torch.equal(params[name].detach(), stored), name
    norms = [p.detach() for n, p in params.items() if n.endswith("norm.weight")]
    assert all(0.85 <= float(p.min()) and float(p.max()) <= 1.15 for p in norms)


def test_a_tensor_read_as_float32_a_piece_at_a_time_holds_its_stored_values(tmp_path):
    from safetensors import safe_open

    from awq_graph.weights import SafetensorsWeights

    folder = build(tmp_path / "ck", "tiny", layers=2, shard_bytes=40_000)
    weights = SafetensorsWeights(folder)
    weights.PIECE_BYTES = 1000  # pieces that split rows, and one buffer reused over the tensors and shards
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    pieces = 0
    for name in weights.names():
        with safe_open(folder / index[name], "pt") as f:
            stored = f.get_tensor(name)
        read = weights.get(name, torch.float32)
        assert read.dtype == torch.float32 and torch.equal(read, stored.float()), name
        assert torch.equal(weights.get(name), stored), name  # in its stored dtype: straight into the tensor
        pieces += -(-stored.numel() * 2 // 1000)
    assert pieces > 2 * len(weights.names())  # most tensors took several pieces


def test_compile_takes_a_sharded_bf16_checkpoint(tmp_path):
    from awq_graph.cli import main

    folder = build(tmp_path / "ck", "tiny", layers=2, shard_bytes=40_000, tokenizer=tiny_tokenizer())
    out = tmp_path / "out"
    assert main(["compile", str(folder), "-o", str(out), "--n-samples", "4", "--seqlen", "32", "--group-size", "16"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert (report["device_peak_mb"] > 0) if torch.cuda.is_available() else report["device_peak_mb"] is None
    graph = report["graph"]  # the float-activations copy against torch with the same integers (measured 2.0e-7)
    assert graph["kind"] == "kv-decoder" and graph["float_check_deviation"] < 1e-4, graph


def test_the_decoder_checks_torch_reference_holds_one_dequantized_weight_at_a_time():
    """The check's reference runs the program with every quantized linear dequantized; made
    where it is read and dropped after, the float copies are not all in memory at once. Same
    logits as with every copy made up front."""
    import weakref

    from awq_graph.core.numerics import QuantScheme
    from awq_graph.emit import fake_quant_makers, fake_quant_overrides
    from awq_graph.export import export_model
    from awq_graph.search import rtn
    from conftest import tiny_model

    gm = export_model(tiny_model(num_hidden_layers=3))
    quantized = rtn(gm, QuantScheme(4, 16)).quantized
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    alive, most = [], 0

    def watched(make):
        def made():
            nonlocal most
            tensor = make()
            alive.append(weakref.ref(tensor))
            most = max(most, sum(r() is not None for r in alive))
            return tensor
        return made

    makers = {name: watched(make) for name, make in fake_quant_makers(gm, quantized).items()}
    with torch.no_grad():
        eager = gm.run(ids, overrides=fake_quant_overrides(gm, quantized))
        lazy = gm.run(ids, made=makers)
    assert torch.equal(eager, lazy)
    assert len(alive) == len(quantized) == 21
    assert most == 1, most  # each one dropped before the next is made (the count includes the new one)
