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

from conftest import REPO, genai_greedy, tiny_model
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


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """Every fused family compiled with round to nearest and the defaults otherwise (int8 activations
    at accuracy level 4), group 32 so that the experts of the MoE models are QMoE banks."""
    root = tmp_path_factory.mktemp("families")
    folders = {}
    for model_type in sorted(FAMILIES):
        result = awq_graph.compile(_tiny(model_type), None, root / model_type, rtn_only=True, scheme="uint4_wo_32")
        assert result.report["graph"]["kind"] == "kv-decoder", model_type
        folders[model_type] = root / model_type
    return folders


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_onnxruntime_genai_runs_the_folder_as_written_and_generates_our_greedy_tokens(model_type, compiled):
    out = compiled[model_type]
    report = json.loads((out / "report.json").read_text())
    assert report["graph"]["runtime_files"] == ["genai_config.json", "config.json", "generation_config.json"]
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["type"] == FAMILIES[model_type].genai
    assert config["search"]["past_present_share_buffer"] is True
    assert_genai_generates_our_tokens(out, PROMPTS)


# optimum-onnx 0.1 sizes the first step's empty cache from config.json: KV heads from num_key_value_heads
# for the model types it lists, else as many as attention heads (head size hidden / heads but for gemma's);
# GroupQueryAttention refuses a past of other heads. The tiny models keep 4 heads over 2 KV heads.
OPTIMUM_CACHE_FITS = {"gemma", "gemma3_text", "gpt2", "granite", "llama", "mistral", "qwen2", "qwen3", "qwen3_moe"}


@pytest.mark.slow
def test_optimum_generates_our_greedy_tokens_in_its_own_environment(compiled, tiny_checkpoint, tmp_path):
    """tools/optimum_generate.py in .venv-optimum (tools/setup.sh makes it): ORTModelForCausalLM over
    each folder, with its cache."""
    import subprocess

    from transformers import AutoTokenizer

    python = REPO / ".venv-optimum" / "bin" / "python"
    assert python.exists(), "run tools/setup.sh: it makes .venv-optimum (optimum-onnx pins transformers < 4.58)"
    with_tokenizer = tmp_path / "checkpoint"  # a folder compiled from a checkpoint: its tokenizer in OUT
    awq_graph.compile(str(tiny_checkpoint), None, with_tokenizer, rtn_only=True, scheme="uint4_wo_32")
    prompt, new, text = PROMPTS[2], 16, "the cat of the city"
    run = subprocess.run([str(python), str(REPO / "tools" / "optimum_generate.py"), "--text", text,
                          ",".join(map(str, prompt)), str(new), str(with_tokenizer), *map(str, compiled.values())],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    # transformers 4 loads the tokenizer transformers 5 saved (its class under the name both know)
    assert theirs[f"{with_tokenizer}#tokens"] == {"ids": AutoTokenizer.from_pretrained(with_tokenizer)(text).input_ids,
                                                  "inputs": ["attention_mask", "input_ids"]}  # no token_type_ids
    compiled = {**compiled, "llama (with its tokenizer)": with_tokenizer}
    for model_type, folder in compiled.items():
        got = theirs[str(folder)]
        if model_type.split()[0] not in OPTIMUM_CACHE_FITS:
            assert "past_key_values" in got["error"], (model_type, got)  # the cache optimum made is refused
            continue
        ours = CompiledModel(folder).greedy_ids(prompt, new)
        stop = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]
        assert got == ours[:len(got)] and (len(got) == new or got[-1] in stop), (model_type, got, ours)


def test_genai_runs_a_float16_folder(tmp_path):
    calib = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    awq_graph.compile(tiny_model(), calib, tmp_path / "fp16", scheme="uint4_wo_16", n_samples=2, seqlen=32,
                      act_dtype="float16")
    assert decoder_signature(tmp_path / "fp16" / "model.onnx").float_type == "float16"
    assert_genai_generates_our_tokens(tmp_path / "fp16", PROMPTS)


@pytest.mark.parametrize("head_bits", [8, 4])
def test_genai_runs_a_folder_with_a_quantized_head_and_table(tmp_path, head_bits):
    """--quantize-lm-head: the head as MatMulNBits and the token lookup as GatherBlockQuantized; at 4
    bits a tied table reads the head's (scaled) integers and undoes the scale, the smallest folder
    the README's speed table deploys (g2)."""
    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    out = tmp_path / f"head{head_bits}"
    awq_graph.compile(tiny_model(tie_word_embeddings=True), calib, out, scheme="uint4_wo_32", n_samples=4, seqlen=32,
                      quantize_lm_head=True, lm_head_bits=head_bits, lm_head_group_size=16)
    import onnx

    ops = {n.op_type for n in onnx.load(out / "model.onnx", load_external_data=False).graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    assert_genai_generates_our_tokens(out, PROMPTS)


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
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert AutoTokenizer.from_pretrained(out)("the cat of the city").input_ids == tokenizer("the cat of the city").input_ids
    # genai's tokenizer reads the folder too: the prompt's ids are the transformers tokenizer's
    model = og.Model(str(out))
    assert list(og.Tokenizer(model).encode("the cat of the city")) == tokenizer("the cat of the city").input_ids
