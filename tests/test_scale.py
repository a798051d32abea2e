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
    norms = [p for n, p in params.items() if n.endswith("norm.weight")]
    assert all(0.85 <= float(p.min()) and float(p.max()) <= 1.15 for p in norms)


def test_compile_takes_a_sharded_bf16_checkpoint(tmp_path):
    from awq_graph.cli import main

    folder = build(tmp_path / "ck", "tiny", layers=2, shard_bytes=40_000, tokenizer=tiny_tokenizer())
    out = tmp_path / "out"
    assert main(["compile", str(folder), "-o", str(out), "--n-samples", "4", "--seqlen", "32", "--group-size", "16"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    graph = report["graph"]  # the float-activations copy against torch with the same integers (measured 1e-6 order)
    assert graph["kind"] == "kv-decoder" and graph["float_check_deviation"] < 1e-4, graph
