"""Load: a local Hugging Face checkpoint folder or a .gguf file -> (model, tokenizer)."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from .errors import InputError

log = logging.getLogger(__name__)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_model(path: str | Path):
    """Returns (model in float32 eval mode, tokenizer). Nothing is fetched from a hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise InputError(f"model path {path} does not exist (give a checkpoint folder or a .gguf file)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(f"model file {path} is not a .gguf file (give a checkpoint folder or a .gguf file)")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise InputError(f"model file {path} is not a GGUF file: it does not start with the GGUF magic bytes")
        kwargs = {"gguf_file": path.name}
        folder = path.parent
    else:
        if not (path / "config.json").exists():
            raise InputError(f"model folder {path} has no config.json: not a Hugging Face checkpoint")
        kwargs, folder = {}, path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32, **kwargs)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"could not load {path}: {_first_line(exc)}") from exc
    model.eval()
    return model, tokenizer
