"""A GGUF file's tensors read one at a time, under Hugging Face names.

transformers' GGUF loading dequantizes the whole file into float tensors before building the
model; here the file is memory-mapped (the ``gguf`` package's reader) and a tensor is
dequantized only when asked for, with transformers' own name map and per-architecture fix-ups
(e.g. llama's q/k row order), so the values are the ones transformers would load.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .core.errors import InputError


class GGUFWeights:
    """``names()``: the HF parameter names the file holds; ``get(name)``: one tensor, float32."""

    def __init__(self, path: str | Path, model=None):
        """``model``: the checkpoint's model built on the meta device, if the caller has one (its
        parameter names are what the file's tensors map to); else one is built here."""
        from gguf import GGUFReader
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map, load_gguf_checkpoint, read_field)

        path = Path(path)
        self.reader = GGUFReader(path)  # a memory map: nothing is read yet
        architecture = read_field(self.reader, "general.architecture")[0]
        config_fields = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config_fields)
        if model is None:
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
            with torch.device("meta"):  # the names only: no weights
                model = AutoModelForCausalLM.from_config(config)
        to_hf = get_gguf_hf_weights_map(model, self.processor)
        self._tensors = {to_hf[t.name]: t for t in self.reader.tensors if t.name in to_hf}
        self.architecture = architecture

    def names(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str, as_dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, dequantized to float32 (``as_dtype`` is float32 or None)."""
        from gguf import dequantize

        if name not in self._tensors:
            raise InputError(f"the GGUF file has no tensor for '{name}'")
        tensor = self._tensors[name]
        result = self.processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                        tensor_key_mapping={}, parsed_parameters={"tensors": {}})
        if result.weights is None:  # processors that split one GGUF tensor into several HF ones
            raise InputError(f"reading '{name}' alone is not supported for GGUF architecture '{self.architecture}'")
        return torch.from_numpy(result.weights.copy()).float()
