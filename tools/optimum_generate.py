"""Greedy tokens from compiled folders through Hugging Face optimum's ORTModelForCausalLM (with the
cache), run in optimum's own environment (optimum-onnx 0.1 pins transformers < 4.58):

    .venv-optimum/bin/python tools/optimum_generate.py PROMPT_IDS NEW FOLDER [FOLDER ...]

PROMPT_IDS: comma-separated token ids. Prints one JSON object: folder -> the new token ids (up to and
including an end-of-text id, where generation stops), or {"error": first line} where optimum fails.
This script imports nothing of awq-graph: tests/test_deploy.py runs it in a subprocess.
"""
from __future__ import annotations

import json
import sys
import warnings


def main(argv: list[str]) -> int:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    warnings.filterwarnings("ignore")
    prompt = torch.tensor([[int(t) for t in argv[0].split(",")]])
    new, results = int(argv[1]), {}
    for folder in argv[2:]:
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
