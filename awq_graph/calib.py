"""Calibration data: a text/jsonl file, token tensors, or text sampled from the model itself."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .core.errors import InputError
from .core.progress import no_progress


def check_text_file(path: str | Path, what: str = "calibration file", hint: str = "") -> None:
    """Fail when ``path`` is not a file to read (``hint``: what to give instead, for the message)."""
    path = Path(path)
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise InputError(f"{what} {path} {state}{hint}")


def read_text(path: str | Path, what: str = "calibration file") -> str:
    """A .txt file as is; a .jsonl file's ``text`` fields joined by blank lines. UTF-8 only:
    other bytes would reach the tokenizer as replacement characters."""
    path = Path(path)
    check_text_file(path, what)
    data = path.read_bytes()
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(f"{what} {path} is not UTF-8 text (byte {exc.start}, line {line})") from None
    raw = raw.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text mode reads them
    if path.suffix.lower() != ".jsonl":
        return raw
    texts = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{what} {path}, line {i}: not a JSON object with a 'text' field") from None
        if not isinstance(text, str):
            raise InputError(f"{what} {path}, line {i}: 'text' is a {type(text).__name__}, not a string")
        texts.append(text)
    return "\n\n".join(texts)


def windows(ids: list[int] | torch.Tensor, n_samples: int, seqlen: int, source: str) -> torch.Tensor:
    """The first ``n_samples`` non-overlapping windows of ``seqlen`` tokens: (n, seqlen)."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n = min(n_samples, ids.numel() // seqlen)
    if n == 0:
        raise InputError(f"calibration from {source} has {ids.numel()} tokens, fewer than one sample of {seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)


def from_file(path, tokenizer, n_samples: int, seqlen: int) -> torch.Tensor:
    text = read_text(path)
    # tokenize only as much text as the samples need (with a margin), not a whole corpus
    need_chars = n_samples * seqlen * 8
    ids = tokenizer(text[:need_chars], add_special_tokens=False).input_ids
    if len(ids) < n_samples * seqlen and len(text) > need_chars:
        ids = tokenizer(text, add_special_tokens=False).input_ids
    return windows(ids, n_samples, seqlen, str(path))


def from_tensors(data, n_samples: int, seqlen: int) -> torch.Tensor:
    """A tensor, a list of tensors or a dataloader of tensors / {'input_ids': ...} batches."""
    if isinstance(data, torch.Tensor):
        data = [data]
    parts = []
    try:
        items = iter(data)
    except TypeError:
        raise InputError(f"calibration: give token ids (a tensor, a list of tensors, a dataloader), a text file or "
                         f"'self', not a {type(data).__name__}") from None
    for item in items:
        if isinstance(item, dict):
            if "input_ids" not in item:
                raise InputError(f"a calibration batch is a dict without 'input_ids' (its keys: {sorted(item)})")
            item = item["input_ids"]
        try:
            ids = torch.as_tensor(item).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"calibration: a batch is not token ids ({type(item).__name__}: {exc})") from None
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            # torch.rand(4, 32) would become all-zero ids: a calibration of one repeated token
            raise InputError(f"calibration tensors must hold integer token ids, and one holds {str(ids.dtype)[6:]} "
                             "values: tokenize the text (or give the file, or 'self')")
        parts.append(ids)
    if not parts:
        raise InputError("the calibration data is empty")
    return windows(torch.cat(parts), n_samples, seqlen, "the given tensors")


@torch.no_grad()
def check_ids_fit(ids: torch.Tensor, vocab: int, source: str) -> None:
    """Token ids from ``source`` must index the model's token table of ``vocab`` rows (a tokenizer
    of another model gives ids the lookup cannot read)."""
    top = int(ids.max()) if ids.numel() else 0
    if top >= vocab or (ids.numel() and int(ids.min()) < 0):
        bad = top if top >= vocab else int(ids.min())
        raise InputError(f"calibration from {source} holds token id {bad}, outside the model's token table of {vocab} "
                         f"rows: the tokenizer does not belong to this model")


def self_generated(model, tokenizer, n_samples: int, seqlen: int, seed: int = 0, batch: int = 64,
                   progress=None) -> torch.Tensor:
    """Text sampled from the model itself, starting from BOS: no dataset needed."""
    progress = progress or no_progress
    gen = torch.Generator().manual_seed(seed)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (tokenizer.eos_token_id or 0)
    with torch.random.fork_rng(devices=[]):  # generate() samples from the global RNG: the caller's is kept
        torch.manual_seed(seed)
        out = []
        steps = range(0, n_samples, batch)
        for i in progress(steps, "self-calibration", len(steps)):
            b = min(batch, n_samples - i)
            first = torch.full((b, 1), start, dtype=torch.long)
            # a random first word per sample keeps the samples apart
            second = torch.randint(0, int(model.config.vocab_size), (b, 1), generator=gen)
            ids = model.generate(input_ids=torch.cat([first, second], 1), attention_mask=torch.ones(b, 2, dtype=torch.long),
                                 do_sample=True, top_k=50, temperature=1.0, max_new_tokens=seqlen - 2,
                                 min_new_tokens=seqlen - 2, pad_token_id=start)
            out.append(ids[:, :seqlen])
    return torch.cat(out)
