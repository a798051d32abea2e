"""Greedy tokens from compiled folders through Hugging Face optimum's ORTModelForCausalLM (with the
cache), run in optimum's own environment (optimum-onnx 0.1 pins transformers < 4.58):

    .venv-optimum/bin/python tools/optimum_generate.py [--text TEXT] PROMPT_IDS NEW FOLDER [FOLDER ...]

PROMPT_IDS: comma-separated token ids. Prints one JSON object: folder -> the new token ids (up to and
including an end-of-text id, where generation stops), or {"error": first line} where optimum fails;
for a folder with a tokenizer, also "folder#tokens": transformers' (4.x) ids of TEXT (--text) and the
names of the inputs its tokenizer returns.
This script imports nothing of awq-graph: tests/test_deploy.py runs it in a subprocess.
"""
from __future__ import annotations

import json
import os
import sys
import warnings


def main(argv: list[str]) -> int:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    warnings.filterwarnings("ignore")
    text = None
    if argv[0] == "--text":
        text, argv = argv[1], argv[2:]
    prompt = torch.tensor([[int(t) for t in argv[0].split(",")]])
    new, results = int(argv[1]), {}
    for folder in argv[2:]:
        if text is not None and os.path.exists(os.path.join(folder, "tokenizer_config.json")):
            from transformers import AutoTokenizer

            try:
                encoded = AutoTokenizer.from_pretrained(folder)(text)
                results[folder + "#tokens"] = {"ids": encoded.input_ids, "inputs": sorted(encoded)}
            except Exception as exc:  # noqa: BLE001 -- reported, the caller judges it
                results[folder + "#tokens"] = {"error": (str(exc).strip().splitlines() or [type(exc).__name__])[0]}
        try:
            model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False)
            results[folder] = out[0, prompt.shape[1]:].tolist()
        except Exception as exc:  # noqa: BLE001 -- reported per folder, the caller judges it
            results[folder] = {"error": (str(exc).strip().splitlines() or [type(exc).__name__])[0]}
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
