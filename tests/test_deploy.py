"""The compiled folder runs under other runtimes as written: onnxruntime-genai (``og.Model(OUT)``)
generates the greedy tokens our runtime generates, for every fused family, float16 too; config.json
and generation_config.json are the checkpoint's, for optimum and anything reading a transformers folder."""
import json

import pytest
import torch

import awq_graph
from awq_graph.emit.deploy import decoder_signature
from awq_graph.emit.families import FAMILIES
from awq_graph.load import tiny_random_model
from awq_graph.runtime import CompiledModel

from conftest import genai_greedy, tiny_model
from test_decoder import FAMILY
from test_moe import MOE_MODELS

og = pytest.importorskip("onnxruntime_genai", reason="pip install onnxruntime-genai (a test dependency)")


def _tiny(model_type: str):
    if model_type in MOE_MODELS:
        return tiny_random_model(model_type, **MOE_MODELS[model_type])
    return tiny_random_model("gpt2") if model_type == "gpt2" else tiny_model(model_type, **FAMILY[model_type])


def assert_genai_generates_our_tokens(folder, prompts, new=16):
    ours_model = CompiledModel(folder)
    stop = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]
    for prompt in prompts:
        theirs, ours = genai_greedy(folder, prompt, new), ours_model.greedy_ids(prompt, new)
        assert theirs == ours[:len(theirs)], (prompt, theirs, ours)
        assert len(theirs) == new or theirs[-1] in stop  # genai stopped early only at an end-of-text id


PROMPTS = [[5], [17, 203, 44, 9], [250, 3, 77, 120, 61, 8, 199, 31, 140]]


def test_every_fused_family_is_in_the_test():
    assert set(FAMILIES) == set(FAMILY) | set(MOE_MODELS)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_onnxruntime_genai_runs_the_folder_as_written_and_generates_our_greedy_tokens(model_type, tmp_path):
    model = _tiny(model_type)
    out = tmp_path / "out"
    # round to nearest with the defaults otherwise (int8 activations at accuracy level 4); group 32 so that
    # the experts of the MoE models can be QMoE banks
    result = awq_graph.compile(model, None, out, rtn_only=True, scheme="uint4_wo_32")
    assert result.report["graph"]["kind"] == "kv-decoder"
    assert result.report["graph"]["runtime_files"] == ["genai_config.json", "config.json", "generation_config.json"]
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["type"] == FAMILIES[model_type].genai
    assert config["search"]["past_present_share_buffer"] is True
    assert_genai_generates_our_tokens(out, PROMPTS)


def test_genai_runs_a_float16_folder(tmp_path):
    calib = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    awq_graph.compile(tiny_model(), calib, tmp_path / "fp16", scheme="uint4_wo_16", n_samples=2, seqlen=32,
                      act_dtype="float16")
    assert decoder_signature(tmp_path / "fp16" / "model.onnx").float_type == "float16"
    assert_genai_generates_our_tokens(tmp_path / "fp16", PROMPTS)


def test_the_configs_describe_the_written_graph_and_the_checkpoint(tiny_checkpoint, tmp_path):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    out = tmp_path / "out"
    awq_graph.compile(str(tiny_checkpoint), None, out, rtn_only=True, scheme="uint4_wo_32")
    genai = json.loads((out / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    checkpoint = AutoConfig.from_pretrained(tiny_checkpoint)
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"],
            decoder["head_size"], genai["model"]["vocab_size"]) == (2, 4, 2, 16, 320)
    assert genai["model"]["context_length"] == genai["search"]["max_length"] == checkpoint.max_position_embeddings
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    # the checkpoint's end-of-text id and the tokenizer's own, as genai's builder writes them
    assert set(genai["model"]["eos_token_id"]) == {checkpoint.eos_token_id, tokenizer.eos_token_id}
    written = {k: v for k, v in AutoConfig.from_pretrained(out).to_dict().items() if k != "_name_or_path"}
    assert written == {k: v for k, v in checkpoint.to_dict().items() if k != "_name_or_path"}
    assert GenerationConfig.from_pretrained(out).eos_token_id == checkpoint.eos_token_id
    # genai's tokenizer reads the folder too: the prompt's ids are the transformers tokenizer's
    model = og.Model(str(out))
    assert list(og.Tokenizer(model).encode("the cat of the city")) == tokenizer("the cat of the city").input_ids
