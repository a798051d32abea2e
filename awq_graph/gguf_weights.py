"""A GGUF file's tensors read one at a time, under Hugging Face names.

transformers' GGUF loading dequantizes the whole file into float tensors before building the
model; here the file is memory-mapped (the ``gguf`` package's reader) and a tensor is
dequantized only when asked for, with transformers' own name map and per-architecture fix-ups
(e.g. llama's q/k row order), so the values are the ones transformers would load.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .core.errors import InputError


class _TopModule:
    """A model seen as one module: its config and its whole state dict, no children."""

    def __init__(self, model):
        self.config, self._names = model.config, model.state_dict()

    def state_dict(self):
        return self._names

    def named_children(self):
        return []


def gguf_to_hf_names(model, processor) -> dict[str, str]:
    """The file's tensor names -> the model's parameter names, by transformers' map. Its function
    walks every submodule and builds gguf's name table at each (seconds, hundreds of times),
    which only a file converted from the base model (Bloom's) needs: the top module's names are
    mapped first, and the whole walk runs only when they leave a parameter unmapped."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    to_hf = get_gguf_hf_weights_map(_TopModule(model), processor)
    mapped = set(to_hf.values())
    if all(name in mapped for name, _ in model.named_parameters()):  # a tied head counted once
        return to_hf
    return get_gguf_hf_weights_map(model, processor)


class GGUFWeights:
    """``names()``: the HF parameter names the file holds; ``get(name)``: one tensor, float32."""

    CHUNK_BYTES = 8 << 20  # of the file per dequantization step

    def __init__(self, path: str | Path, model=None):
        """``model``: the checkpoint's model built on the meta device, if the caller has one (its
        parameter names are what the file's tensors map to); else one is built here."""
        from gguf import GGUFReader
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, read_field

        path = Path(path)
        self.path = path
        self.reader = GGUFReader(path)  # a memory map: nothing is read yet
        architecture = read_field(self.reader, "general.architecture")[0]
        if model is None:
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
            with torch.device("meta"):  # the names only: no weights
                model = AutoModelForCausalLM.from_config(config)
        # the processors read head counts from the config under transformers' names: the model's
        # config has them (parsing the file's fields again for them takes seconds)
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())
        to_hf = gguf_to_hf_names(model, self.processor)
        self._tensors = {to_hf[t.name]: t for t in self.reader.tensors if t.name in to_hf}
        self.architecture = architecture

    def names(self) -> list[str]:
        return list(self._tensors)

    def sample_bytes(self, name: str, size: int) -> bytes:
        """Up to ``size`` stored (quantized) bytes of ``name`` at its start, middle and end."""
        raw = self._tensors[name].data.reshape(-1).view("uint8")
        middle = max(0, raw.size // 2 - size // 2)
        return b"".join(raw[start:start + size].tobytes() for start in sorted({0, middle, max(0, raw.size - size)}))

    def get(self, name: str, as_dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, dequantized to float32 (``as_dtype`` is float32 or None)."""
        if name not in self._tensors:
            raise InputError(f"the GGUF file has no tensor for '{name}'")
        tensor = self._tensors[name]
        result = self.processor.process(weights=self._dequantized(tensor), name=tensor.name,
                                        tensor_key_mapping={}, parsed_parameters={"tensors": {}})
        if result.weights is None:  # processors that split one GGUF tensor into several HF ones
            raise InputError(f"reading '{name}' alone is not supported for GGUF architecture '{self.architecture}'")
        weights = result.weights
        if not (weights.flags.writeable and weights.flags.c_contiguous and weights.dtype == np.float32):
            weights = np.ascontiguousarray(weights, dtype=np.float32).copy()  # a processor's read-only view
        return torch.from_numpy(weights)

    def _dequantized(self, tensor) -> np.ndarray:
        """The tensor in float32, dequantized ``CHUNK_BYTES`` of the file at a time into one array
        read with plain file reads: gguf's dequantize of a whole tensor makes temporaries of about
        twice its float32 output (a large vocabulary's head: GBs), and the pages of
        the file's memory map, once touched, count in the process's resident set for as long as
        the map lives (the whole file, after a pass over the weights)."""
        from gguf import dequantize

        view = tensor.data  # the memory map's view: its shape and dtype, nothing read
        rows = view.reshape(-1, view.shape[-1]) if view.ndim > 1 else view.reshape(1, -1)
        row_bytes = rows.shape[1] * rows.dtype.itemsize
        step = max(1, self.CHUNK_BYTES // max(1, row_bytes))
        out = None
        with open(self.path, "rb", buffering=0) as f:
            for start in range(0, rows.shape[0], step):
                count = min(step, rows.shape[0] - start)
                chunk = np.empty((count, rows.shape[1]), rows.dtype)
                f.seek(tensor.data_offset + start * row_bytes)
                if f.readinto(memoryview(chunk).cast("B")) != chunk.nbytes:
                    raise InputError(f"{self.path} is truncated: tensor '{tensor.name}' runs past its end")
                values = dequantize(chunk, tensor.tensor_type)
                if out is None:
                    out = np.empty((rows.shape[0], values.shape[-1]), np.float32)
                out[start:start + count] = values
        return out.reshape(*view.shape[:-1], out.shape[-1]) if view.ndim > 1 else out.reshape(-1)
