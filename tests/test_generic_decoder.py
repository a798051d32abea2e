"""The generic KV-cache decoder: architectures outside the fused families whose cache
transformers keeps in its standard layers (keys and values, indexer keys, linear-attention
states) get torch.onnx of the model with its cache, MatMulNBits for every quantized linear,
checked at compile. Greedy tokens through its cache equal torch's with the same dequantized
weights (HF ``generate`` with its own cache, or a recompute loop where generate cannot)."""
import copy
import re

import pytest
import torch

from awq_graph.core.numerics import QuantScheme
from awq_graph.emit import write_onnx
from awq_graph.emit.generic import GenericUnsupported, cache_layout
from awq_graph.export import export_model
from awq_graph.load import tiny_random_model
from awq_graph.passes.check_config import derive_groups
from awq_graph.runtime import CompiledModel
from awq_graph.search import SearchOptions, awq_search


def _fake_quant_model(model, gm, quantized):
    """The HF model with the program's folded weights and each quantized linear dequantized."""
    twin = copy.deepcopy(model)
    state = twin.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in gm.params.items():
            if name in state:
                state[name].copy_(tensor)
        for name, q in quantized.items():
            site = gm.linears[name]
            state[site.weight].copy_(site.stored(q.dequantize()))
    return twin.eval()


def _greedy_by_recompute(model, prompt, new_tokens):
    """Greedy tokens, each from the model's forward over the whole sequence (no cache)."""
    ids = prompt
    for _ in range(new_tokens):
        ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


# cohere: attention and MLP in parallel on one LayerNorm, logit scale; starcoder2: a
# sliding window of 16 (the prompt and the tokens run past it; torch's cache keeps the window,
# ours every key, under the model's windowed mask); roberta: positions counted from its padding
# id, so the graph takes no position_ids; bart: an encoder-decoder's decoder as a causal LM;
# lfm3: short convolutions (a state) and an attention layer; mamba: selective state spaces,
# whose export fixes the length: both graphs take one token per step; deepseek_v32: sparse
# attention over the top 4 keys by its indexer, whose keys are cached too
@pytest.mark.parametrize("model_type,prompt_len", [("cohere", 7), ("starcoder2", 20), ("roberta", 7), ("bart", 7),
                                                   ("lfm3", 7), ("mamba", 7), ("deepseek_v32", 7)])
def test_greedy_tokens_through_the_generic_cache_equal_torchs(model_type, prompt_len, tmp_path):
    model = tiny_random_model(model_type)
    gm = export_model(model, seqlen=32)
    _, per_layer, _ = derive_groups(gm)
    calib = torch.randint(3, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    result = awq_search(gm, per_layer, calib, SearchOptions(scheme=QuantScheme(4, 16), loss_tokens=64))
    emitted = write_onnx(gm, result.quantized, tmp_path / "model.onnx", model=model, accuracy_level=0)
    assert emitted.kind == "generic-kv-decoder", emitted.warnings
    assert emitted.quantized_linears == len(result.quantized)
    assert emitted.check_deviation < 1e-4, emitted  # the compile's own check: measured 1.7e-7 .. 9.0e-7 (lfm3)
    compiled = CompiledModel(tmp_path / "model.onnx")
    assert compiled.has_kv_cache and compiled.growing_cache
    assert compiled.one_token == (model_type in ("lfm3", "mamba"))
    reference = _fake_quant_model(model, gm, result.quantized)
    prompt = torch.randint(3, 320, (1, prompt_len), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # generate feeds RoBERTa positions from 0 (its own count from its padding id + 1), and fails on
        # BartForCausalLM (the cache it builds from the encoder-decoder config: transformers 5.24)
        if model_type in ("roberta", "bart"):
            want = _greedy_by_recompute(reference, prompt, 10)
        else:
            want = reference.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)[0, prompt_len:].tolist()
        full = reference(torch.cat([prompt, torch.tensor([want])], dim=1), use_cache=False).logits.float().numpy()
    assert compiled.greedy_ids(prompt[0].tolist(), 10) == want
    # and the logits: a prefill of the prompt, then one token per step against the cache
    ids = torch.cat([prompt, torch.tensor([want])], dim=1).numpy()
    got = compiled.logits_with_cache(ids, prefill=prompt_len)
    deviation = float(((got - full) ** 2).sum() ** 0.5 / (full ** 2).sum() ** 0.5)
    assert deviation < 1e-4, deviation  # measured 1.6e-7 .. 7.8e-7 (lfm3)


@pytest.mark.parametrize("model_type,why", [("recurrent_gemma", "its forward returns no cache"),
                                             ("minimax", "its forward with a cache failed (MiniMax uses cache of its own")])
def test_a_cache_of_another_kind_is_refused_with_its_reason(model_type, why):
    """(The compile then writes the logits-only graph with this reason: tests/test_decoder.py.)"""
    with pytest.raises(GenericUnsupported, match=re.escape(why)):
        cache_layout(tiny_random_model(model_type))
