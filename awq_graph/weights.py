"""A checkpoint's weights read one tensor at a time, and the parameter store a streaming
compile reads and edits (``ParamStore``): depth-flat memory.

``SafetensorsWeights`` reads a tensor's bytes with plain file reads at its offset, not through
a memory map: the pages of a mapped file count in the process's resident set (``ru_maxrss``)
for as long as the map lives, so mapping a checkpoint would put all of it on the books,
while a read copies one tensor and leaves the rest of the file in the page cache, which is
not the process's.
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from .core.errors import InputError
from .core.heap import MMAP_THRESHOLD, trim_heap

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SafetensorsWeights:
    """The tensors of ``model.safetensors`` or of the shards ``model.safetensors.index.json``
    lists: ``names()``, ``shape(name)``, ``get(name)`` (one tensor, in its stored dtype)."""

    PIECE_BYTES = 16 << 20  # of the file per conversion step

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise InputError(f"{index} is not a safetensors index (no weight_map object)") from exc
            if not files:
                raise InputError(f"{index} has an empty weight_map: it names no shard")
            if not all(isinstance(f, str) for f in files):
                raise InputError(f"{index}: its weight_map has a shard that is not a file name")
        else:
            files = ["model.safetensors"]
        self._where: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        self._piece: torch.Tensor | None = None  # get's buffer, made on the first conversion
        for name in files:
            path = folder / name
            if not path.exists():
                raise InputError(f"the checkpoint's shard {path} is missing")
            self._read_header(path)

    def _read_header(self, path: Path) -> None:
        """Every tensor's entry checked before anything is allocated: a known dtype, a shape of
        non-negative integers, a byte range inside the file whose length is the shape's bytes."""
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < size < (100 << 20):
                raise InputError(f"{path} is not a safetensors file (its header length is {size})")
            try:
                header = json.loads(f.read(size))
            except ValueError as exc:
                raise InputError(f"{path} is not a safetensors file (its header is not JSON)") from exc
        if not isinstance(header, dict):
            raise InputError(f"{path} is not a safetensors file (its header is not a JSON object)")
        base = 8 + size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            where = f"tensor '{name}' in {path}"
            if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
                dtype = info.get("dtype") if isinstance(info, dict) else None
                raise InputError(f"{where} has dtype {dtype}, which awq-graph does not read")
            shape, offsets = info.get("shape"), info.get("data_offsets")
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise InputError(f"{where}: its header's shape {shape!r} is not a list of sizes: the header is damaged")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                    and 0 <= offsets[0] <= offsets[1]):
                raise InputError(f"{where}: its header's data_offsets {offsets!r} are not a byte range: "
                                 "the header is damaged")
            start, end = offsets
            dtype = _DTYPES[info["dtype"]]
            needs = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if end - start != needs:
                raise InputError(f"{where}: its header says shape {tuple(shape)} of {info['dtype']}, {needs} bytes, "
                                 f"and gives it {end - start} bytes: the header is damaged")
            if base + end > file_size:
                raise InputError(f"{path} is truncated: {where} ends at byte {base + end}, the file has {file_size}")
            self._where[name] = (path, dtype, tuple(shape), base + start, end - start)

    def names(self) -> list[str]:
        return list(self._where)

    def location(self, name: str) -> tuple[Path, int, int]:
        """Where a tensor's bytes lie: (file, offset, length)."""
        path, _, _, offset, length = self._where[name]
        return path, offset, length

    def dtype(self, name: str) -> torch.dtype:
        return self._where[name][1]

    def numel(self, name: str) -> int:
        return math.prod(self._where[name][2])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name][2]

    def sample_bytes(self, name: str, size: int) -> bytes:
        """Up to ``size`` stored bytes of ``name`` at its start, middle and end (a digest's sample:
        ``awq_graph.fingerprint``), read without reading the tensor."""
        path, _, _, offset, length = self._where[name]
        starts = sorted({0, max(0, length // 2 - size // 2), max(0, length - size)})
        with open(path, "rb") as f:
            pieces = []
            for start in starts:
                f.seek(offset + start)
                pieces.append(f.read(min(size, length - start)))
        return b"".join(pieces)

    def get(self, name: str, as_dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, in its stored dtype or converted to ``as_dtype`` piece by piece (16 MB of
        the file at a time: a 2 GB float32 table from bf16 takes 2 GB, not 3). The pieces go
        through one buffer kept for the next read: a fresh one per piece, faulted in page by page,
        made reading a layer about twice as slow."""
        path, dtype, shape, offset, length = self._where[name]
        out_dtype = as_dtype or dtype
        out = torch.empty(shape, dtype=out_dtype)
        if not length:
            return out
        flat = out.reshape(-1)
        size = torch.empty((), dtype=dtype).element_size()
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            if out_dtype == dtype:  # straight into the tensor's memory
                if f.readinto(memoryview(flat.view(torch.uint8).numpy())) != length:
                    raise InputError(f"{path} is truncated: tensor '{name}' runs past its end")
                return out
            piece = (self.PIECE_BYTES // size) * size
            if self._piece is None:
                self._piece = torch.empty(self.PIECE_BYTES, dtype=torch.uint8)
            buffer = memoryview(self._piece.numpy())
            for start in range(0, length, piece):
                n = min(piece, length - start)
                if f.readinto(buffer[:n]) != n:
                    raise InputError(f"{path} is truncated: tensor '{name}' runs past its end")
                flat[start // size:(start + n) // size] = self._piece[:n].view(dtype)
        return out


class RenamedWeights:
    """A checkpoint's tensors under the names the model's parameters carry, where transformers
    renames or merges them on loading (its conversion mapping): a renamed tensor is read as it
    is; a bank of experts (E, out, in) merged from one tensor per expert, and per source (gate
    and up, stacked along the rows: Mixtral's ``w1``/``w3``, Qwen's ``gate_proj``/``up_proj``)
    is put together when read, each expert's tensor copied into its slot (the bank plus one
    expert in memory). ``merged``: model name -> its sources, one list per source pattern in
    the concatenation's order, each in expert order."""

    def __init__(self, source, renamed: dict[str, str], merged: dict[str, list[list[str]]]):
        self.source = source
        self._renamed = renamed
        self._merged = merged
        hidden = set(renamed.values()) | {k for parts in merged.values() for part in parts for k in part}
        self._names = [n for n in source.names() if n not in hidden] + list(renamed) + list(merged)

    def names(self) -> list[str]:
        return list(self._names)

    def _first(self, name: str) -> str:
        return self._merged[name][0][0] if name in self._merged else self._renamed.get(name, name)

    def dtype(self, name: str) -> torch.dtype:
        return self.source.dtype(self._first(name))

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._merged:
            return tuple(self.source.shape(self._renamed.get(name, name)))
        parts = self._merged[name]
        rows, cols = self.source.shape(parts[0][0])
        return (len(parts[0]), rows * len(parts), cols)

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def sample_bytes(self, name: str, size: int) -> bytes:
        if name not in self._merged:
            return self.source.sample_bytes(self._renamed.get(name, name), size)
        return b"".join(self.source.sample_bytes(key, size) for part in self._merged[name] for key in part)

    def get(self, name: str, as_dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self._merged:
            return self.source.get(self._renamed.get(name, name), as_dtype)
        parts = self._merged[name]
        bank = torch.empty(self.shape(name), dtype=as_dtype or self.dtype(name))
        rows = bank.shape[1] // len(parts)
        for p, part in enumerate(parts):
            for e, key in enumerate(part):
                bank[e, p * rows:(p + 1) * rows] = self.source.get(key, as_dtype)
        return bank


def check_finite_tensor(name: str, tensor: torch.Tensor) -> None:
    """Fail with one line naming ``name`` when ``tensor`` holds NaN or inf: a damaged checkpoint
    would otherwise compile into a model whose every output is NaN. A NaN or an infinity anywhere
    makes the sum one (far faster than ``isfinite`` over every value); only then are they counted."""
    if bool(torch.isfinite(tensor.sum())):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:  # finite values whose sum overflowed are not damage
        raise InputError(f"weight '{name}' holds {bad} NaN or infinite value{'s' if bad > 1 else ''} "
                         f"(of {tensor.numel()}): the checkpoint is damaged; nothing was compiled")


class ParamStore(Mapping):
    """HF parameter name -> float32 tensor, read from the checkpoint when asked.

    Outside ``hold()`` every read is a fresh tensor nobody keeps (the caller drops it when done);
    inside, what is read stays resident, so that the folds edit it in place. ``release`` ends
    residency: a parameter whose float values are no longer needed (a quantized weight, once its
    integers exist) becomes ``spent``, and reading it again is an error rather than a silent read
    of the unfolded checkpoint; a parameter a fold edited stays resident for the emission. Tied
    names (``lm_head.weight`` reading ``model.embed_tokens.weight``) share one entry, as they
    share one tensor in a loaded model. ``fixed``: tensors not in the checkpoint (buffers).
    """

    def __init__(self, source, shapes: dict[str, torch.Size], aliases: dict[str, str] | None = None,
                 fixed: dict[str, torch.Tensor] | None = None):
        self.source = source
        self._shapes = dict(shapes)
        self._aliases = dict(aliases or {})
        self._fixed = dict(fixed or {})
        self._resident: dict[str, torch.Tensor] = {}
        self._spent: set[str] = set()
        self._holding = False

    def _key(self, name: str) -> str:
        return self._aliases.get(name, name)

    def shape_of(self, name: str) -> torch.Size:
        return torch.Size(self._shapes[name])

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._shapes:
            raise KeyError(name)
        if name in self._fixed:
            return self._fixed[name]
        key = self._key(name)
        if key in self._spent:
            raise RuntimeError(f"awq-graph bug: parameter '{name}' was read after its layer was quantized and released")
        if key in self._resident:
            return self._resident[key]
        tensor = self._read(key, name)
        if self._holding:
            self._resident[key] = tensor
        return tensor

    def _read(self, key: str, name: str) -> torch.Tensor:
        if 4 * math.prod(self._shapes[name]) >= MMAP_THRESHOLD:
            trim_heap()
        tensor = self.source.get(key, torch.float32)
        if tensor.shape != self._shapes[name]:
            raise InputError(f"tensor '{key}' in the checkpoint has shape {tuple(tensor.shape)}, the model's config "
                             f"says {tuple(self._shapes[name])}")
        check_finite_tensor(key, tensor)
        return tensor

    @contextmanager
    def hold(self):
        """Keep what is read from here on resident (until ``release``)."""
        before, self._holding = self._holding, True
        try:
            yield self
        finally:
            self._holding = before

    def release(self, names, spent: bool = False) -> None:
        for name in names:
            key = self._key(name)
            if key not in self._fixed:
                self._resident.pop(key, None)
                if spent:
                    self._spent.add(key)
        trim_heap()  # what they held goes back to the OS now, not at some later read

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._resident.values())

    def resident(self) -> set[str]:
        """The parameters held in memory now (read, or edited by a fold and kept)."""
        return set(self._resident)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, name) -> bool:
        return name in self._shapes
