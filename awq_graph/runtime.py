"""onnxruntime side: sessions on a compiled folder, logits and perplexity."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .errors import InputError


def session(model_path: str | Path, threads: int | None = None, provider: str = "cpu"):
    import onnxruntime as ort

    model_path = Path(model_path)
    if model_path.is_dir():
        model_path = model_path / "model.onnx"
    if not model_path.is_file():
        raise InputError(f"{model_path} does not exist: not a compiled awq-graph folder")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(model_path), opts, providers=providers)


def onnx_logits(sess):
    name = sess.get_inputs()[0].name

    def run(ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {name: ids.numpy().astype(np.int64)})[0])

    return run


def torch_logits(model):
    @torch.no_grad()
    def run(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits

    return run


def perplexity(logits_fn, ids, seqlen: int = 2048, max_windows: int | None = None, progress=None):
    """exp(mean NLL) over non-overlapping windows of ``seqlen`` tokens; each window predicts
    its tokens 1..seqlen-1. Returns (ppl, tokens scored)."""
    progress = progress or (lambda it, desc, total: it)
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n = ids.numel() // seqlen
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise InputError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    nll, count = 0.0, 0
    for w in progress(range(n), "perplexity", n):
        window = ids[w * seqlen:(w + 1) * seqlen].unsqueeze(0)
        logits = logits_fn(window)[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
        count += seqlen - 1
    return math.exp(nll / count), count


def greedy_text(logits_fn, tokenizer, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy continuation, re-running the whole prefix per token (this graph has no KV cache)."""
    ids = torch.tensor([tokenizer(prompt).input_ids])
    for _ in range(max_new_tokens):
        nxt = logits_fn(ids)[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        if tokenizer.eos_token_id is not None and int(nxt) == tokenizer.eos_token_id:
            break
    return tokenizer.decode(ids[0], skip_special_tokens=True)
