"""A checkpoint given by path is compiled one tensor at a time (awq_graph.weights): the graph is
traced on the meta device, each decoder layer's weights are read in float32 while it is searched
and released once its integers exist, and the integers are held packed. The result is the same
file as compiling the whole model loaded in float32 (``--no-stream``), and the memory it takes
does not grow with depth."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, tiny_model, tiny_tokenizer

sys.path.insert(0, str(REPO / "tools"))
from random_checkpoint import build  # noqa: E402


def _calibration():
    return torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("how", [{"rtn_only": True}, {}], ids=["rtn", "awq"])
def test_a_streamed_compile_writes_the_bytes_of_the_in_memory_compile(tmp_path, how):
    from awq_graph import compile

    folder = build(tmp_path / "ck", "tiny", layers=3, shard_bytes=40_000)  # bf16, in 5 shards
    outs = {}
    for stream in (True, False):
        outs[stream] = tmp_path / f"out-{stream}"
        result = compile(folder, _calibration(), outs[stream], n_samples=8, seqlen=32, scheme="uint4_wo_32",
                         stream=stream, **how)
        assert result.report["weights"]["streamed"] is stream, result.report["weights"]
    assert result.report["weights"]["loaded_whole_because"] == "`stream=False`"
    for name in ("model.onnx", "model.onnx.data"):
        assert (outs[True] / name).read_bytes() == (outs[False] / name).read_bytes(), name
    streamed = json.loads((outs[True] / "report.json").read_text())
    whole = json.loads((outs[False] / "report.json").read_text())
    assert streamed["groups"] == whole["groups"] and streamed["clipping"] == whole["clipping"]
    assert streamed["graph"]["check_deviation"] == whole["graph"]["check_deviation"]


@pytest.mark.parametrize("model_type,overrides", [("mixtral", {"num_local_experts": 12}), ("qwen2_moe", {})])
def test_a_moe_checkpoint_of_one_tensor_per_expert_streams_the_bytes_of_the_in_memory_compile(tmp_path, model_type,
                                                                                              overrides):
    """Mixtral's and Qwen-MoE's checkpoints hold one tensor per expert and per gate, up and down,
    which transformers merges into one bank per layer as it loads them; a streamed compile merges
    them as it reads the layer (experts in their numbers' order: 12 of them, so 10 and 11 sort
    after 2), and the graph traced on the meta device counts the tokens per expert as the CPU
    does (modeling code takes another branch for meta tensors). Three layers: the trace computes
    the experts' sizes once, in layer 0, for every layer (layer 2 reads them two layers back)."""
    from safetensors import safe_open

    from awq_graph import compile
    from awq_graph.load import tiny_random_model

    folder = tmp_path / "ck"
    tiny_random_model(model_type, num_hidden_layers=3, **overrides).to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert any(".experts.11." in k or ".experts.3." in k for k in f.keys())  # per expert on disk
    outs = {}
    for stream in (True, False):
        outs[stream] = tmp_path / f"out-{stream}"
        result = compile(folder, _calibration(), outs[stream], n_samples=8, seqlen=32, scheme="uint4_wo_32",
                         stream=stream)
        assert result.report["weights"]["streamed"] is stream, result.report["weights"]
        assert result.report["graph"]["kind"] == "kv-decoder"
    for name in ("model.onnx", "model.onnx.data"):
        assert (outs[True] / name).read_bytes() == (outs[False] / name).read_bytes(), name


def test_a_streamed_search_keeps_only_what_the_folds_edited_outside_the_quantized_weights(tmp_path):
    """After the search the store holds no decoder weight: the quantized ones are spent (reading
    one again is an error, never a silent read of the unfolded checkpoint), the rest released;
    only the norms the folds divided stay resident, for the emission."""
    from awq_graph.export import export_model
    from awq_graph.load import open_skeleton
    from awq_graph.match import match
    from awq_graph.search import SearchOptions, awq_search

    folder = build(tmp_path / "ck", "tiny", layers=3, shard_bytes=40_000)
    skeleton, why = open_skeleton(folder)
    assert why is None
    gm = export_model(skeleton.model, skeleton=skeleton)
    assert gm.streamed and gm.params.resident_bytes() == 0
    per_layer, _ = match(gm).for_search()
    result = awq_search(gm, per_layer, _calibration(), SearchOptions())
    kept = gm.params.resident()
    edited = {name for f in result.folded for name in f.params}
    assert kept and kept <= edited and all(name.endswith("norm.weight") for name in kept), kept
    with pytest.raises(RuntimeError, match="read after its layer was quantized"):
        gm.params["model.layers.1.mlp.down_proj.weight"]
    assert set(result.quantized) == {n for n in gm.linears if n != "lm_head"}


def test_a_checkpoint_that_cannot_stream_is_loaded_whole_and_the_report_says_why(tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    from awq_graph import compile

    folder = build(tmp_path / "ck", "tiny", layers=2)
    (tmp_path / "bin").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "bin")
    torch.save(AutoModelForCausalLM.from_pretrained(folder).state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    result = compile(tmp_path / "bin", None, tmp_path / "out", rtn_only=True, scheme="uint4_wo_32")
    assert result.report["weights"] == {"streamed": False,
                                        "loaded_whole_because": "the checkpoint is not in safetensors or GGUF"}


def test_a_damaged_tensor_in_a_streamed_checkpoint_is_one_line_naming_it(tmp_path, capsys):
    from awq_graph.cli import main
    from awq_graph.weights import SafetensorsWeights

    folder = build(tmp_path / "ck", "tiny", layers=2, tokenizer=tiny_tokenizer())
    weights = SafetensorsWeights(folder)
    path, offset, _ = weights.location("model.layers.1.mlp.up_proj.weight")
    with open(path, "r+b") as f:  # one bf16 NaN (0x7fc0) in the middle of the file
        f.seek(offset + 64)
        f.write(bytes([0xC0, 0x7F]))
    assert main(["compile", str(folder), "-o", str(tmp_path / "out"), "--rtn", "--group-size", "32"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("awq-graph: error: weight 'model.layers.1.mlp.up_proj.weight' holds 1 NaN or infinite value "
                       "(of 8192): the checkpoint is damaged; nothing was compiled"), err
    assert not (tmp_path / "out").exists()


_PEAK = """
import resource, sys, torch
from awq_graph import compile
calib = torch.randint(3, 300, (4, 64), generator=torch.Generator().manual_seed(0))
compile(sys.argv[1], calib, sys.argv[2], n_samples=4, seqlen=64, stream=sys.argv[3] == "1", overwrite=True,
        grid_points=4)  # the memory measured does not depend on the grid's length: its points run one by one
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


@pytest.mark.slow
@pytest.mark.parametrize("shape,layer_mb", [("wide", 63.0), ("moe-wide", 51.0)])
def test_the_memory_of_a_streamed_compile_does_not_grow_with_depth(tmp_path, shape, layer_mb):
    """AWQ compiles of one width (63 MB of float32 weights per layer; the MoE shape 51 MB, 8
    experts in Mixtral's checkpoint layout) at 2 and 4 layers, each in its own process (peak RSS,
    ru_maxrss). Loaded whole (--no-stream), 4 more layers cost +313 MB here; streamed, the 2 more
    should cost well under their float32. glibc is told to map every allocation over 64 KB on its
    own (``MALLOC_MMAP_THRESHOLD_``), so that a freed tensor leaves the RSS at once: the peak is
    then what was live, not what the heap kept (with glibc's defaults the same compile's peak moved
    by up to 60 MB between runs, and took the lower of two)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}
    peak = {}
    for layers in (2, 4):
        folder = build(tmp_path / f"ck{layers}", shape, layers=layers)
        run = subprocess.run([sys.executable, "-c", _PEAK, str(folder), str(tmp_path / "out"), "1"],
                             capture_output=True, text=True, cwd=REPO, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        peak[layers] = float(run.stdout.split()[-1])
    growth = peak[4] - peak[2]
    two_layers = 2 * layer_mb
    print(f"peak RSS MB: {peak}; 2 more layers: +{growth:.0f} MB (their float32 weights: {two_layers:.0f} MB)")
    # measured +2 .. +16 MB for 4 more layers over 3 pairs of runs (the integers are spilled to disk
    # as layers finish); glibc's defaults had moved the peak by up to 60 MB between runs
    assert growth < 0.4 * two_layers, peak


def test_eval_of_a_checkpoint_too_large_for_float32_runs_in_its_stored_dtype(tmp_path, capsys):
    """The float baseline of a model whose float32 copy would not fit runs in bfloat16 (its
    stored dtype), says so, and scores close to float32."""
    from awq_graph.cli import main
    from awq_graph.load import eval_dtype

    folder = build(tmp_path / "ck", "tiny", layers=2, tokenizer=tiny_tokenizer())  # bf16 safetensors
    elements = 4 * 64 * 64 + 2 * 64 * 16 * 2 + 3 * 64 * 128 + 320 * 64  # enough to be over 0.8 of a tiny budget
    assert eval_dtype(folder, "auto", available=1 << 40) == (torch.float32, None)
    dtype, note = eval_dtype(folder, "auto", available=elements)  # float32 takes ~4x that
    assert dtype == torch.bfloat16 and "running in bfloat16, its stored dtype" in note, note
    assert eval_dtype(folder, "stored")[0] == torch.bfloat16
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"the cat of the city is {n} and more text" for n in range(60)))
    scores = {}
    for dtype in ("float32", "stored"):
        assert main(["eval", str(folder), "--text", str(text), "--seqlen", "64", "--json", "--dtype", dtype]) == 0
        out, err = capsys.readouterr()
        scores[dtype] = json.loads(out)["ppl"]
        assert ("stored dtype" in err) == (dtype == "stored"), err
    ratio = scores["stored"] / scores["float32"]
    assert abs(ratio - 1) < 0.02, scores  # bf16 activations; measured 1.000009


def test_self_calibration_of_a_model_too_large_for_float32_samples_in_its_stored_dtype(tmp_path):
    """--calib self loads the whole model to sample its text: in float32 where that fits, else in its
    stored dtype (bfloat16 here), said in a warning; the samples are token ids of the model's vocabulary."""
    from awq_graph.calib import self_generated
    from awq_graph.load import load_float_model, load_tokenizer, sampler_dtype

    folder = build(tmp_path / "ck", "tiny", layers=2, tokenizer=tiny_tokenizer())
    elements = 4 * 64 * 64 + 2 * 64 * 16 * 2 + 3 * 64 * 128 + 320 * 64  # float32 takes ~4x: over 0.8 of it
    assert sampler_dtype(folder, available=1 << 40) == (torch.float32, None)
    dtype, note = sampler_dtype(folder, available=elements)
    assert dtype == torch.bfloat16 and "in bfloat16, its stored dtype" in note, note
    model = load_float_model(folder, dtype)
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = self_generated(model, load_tokenizer(folder), n_samples=3, seqlen=12)
    assert ids.shape == (3, 12) and 0 <= int(ids.min()) and int(ids.max()) < 320


@pytest.mark.parametrize("model_type,gguf_arch,shape", [
    ("llama", "llama", dict(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)),
    ("qwen2_moe", "qwen2moe", dict(intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                   num_experts=4, num_attention_heads=4, num_key_value_heads=2)),
    ("bloom", "bloom", dict(n_head=4, n_layer=2)),  # its top module leaves names unmapped: the whole walk runs
])
def test_a_gguf_files_tensor_names_map_as_transformers_maps_them(model_type, gguf_arch, shape):
    """GGUF names -> the model's names, mapped from the top module (the whole walk only when that
    leaves a parameter out), equal transformers' own map, which walks every submodule."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    from awq_graph.gguf_weights import gguf_to_hf_names

    config = AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=2, vocab_size=100, **shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    processor = TENSOR_PROCESSORS.get(gguf_arch, TensorProcessor)(config=config.to_dict())
    expected = get_gguf_hf_weights_map(model, processor)
    assert len(expected) >= 21 and gguf_to_hf_names(model, processor) == expected


def test_eval_of_a_checkpoint_runs_a_layer_at_a_time_and_scores_what_the_whole_model_scores(tmp_path, capsys):
    """``eval MODEL`` streams the float model a decoder layer at a time over every window; its
    perplexity is the whole model's (--dtype stored: the whole float32 checkpoint in memory) to
    float32 rounding, whether every window is held at once or one per pass over the layers."""
    from awq_graph.cli import main
    from awq_graph.float_eval import streamed_perplexity, streamed_program, windows_of
    from awq_graph.load import load_tokenizer

    folder = tmp_path / "ck"
    tiny_model(num_hidden_layers=3).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"the song of the king is {n} and the river of the world is {n * 7}" for n in range(80)))
    scores = {}
    for dtype in ("auto", "stored"):
        assert main(["eval", str(folder), "--text", str(text), "--seqlen", "64", "--json", "--dtype", dtype]) == 0
        out, err = capsys.readouterr()
        scores[dtype] = json.loads(out)
        assert "is loaded whole" not in err, err
    ids = load_tokenizer(folder)(text.read_text(), add_special_tokens=False).input_ids
    gm, why = streamed_program(folder, 64)
    assert gm is not None and gm.streamed, why
    one_per_pass, tokens = streamed_perplexity(gm, windows_of(ids, 64), budget=1)
    relative = abs(scores["auto"]["ppl"] / scores["stored"]["ppl"] - 1)
    print(f"streamed {scores['auto']['ppl']:.6f}, whole {scores['stored']['ppl']:.6f}: {relative:.1e} relative")
    assert scores["auto"]["tokens"] == scores["stored"]["tokens"] == tokens > 64 * 10
    assert relative < 1e-5  # measured 0 (the same float32 ops in the same order)
    assert abs(one_per_pass / scores["auto"]["ppl"] - 1) < 1e-9
