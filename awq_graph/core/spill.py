"""The integers of a compile on disk from the search to the emission (``IntegerSpill``), so that
memory holds one layer's integers, not the model's.

The search hands each linear's packed arrays (``PackedWeight``) to ``IntegerSpill.put`` as its
layer finishes; what it keeps is a ``SpilledWeight``: where the arrays lie in the scratch file,
and the SHA-256 of each array as the search made it. The emission reads them back one tensor
at a time when it writes the ONNX data file (``SpilledWeight.array``, also for the rows of
several linears written as one, q|k|v), and ``awq_graph.emit.check_written_integers`` then reads every
MatMulNBits initializer back from the written file and compares its bytes, linear by linear,
with those digests: the file holds the integers the search chose, whatever the path between.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .numerics import PackedWeight, QuantScheme

ARRAYS = ("blob", "scales", "zeros")


def digest(data) -> str:
    """SHA-256 of an array's bytes (or of bytes), as the search records it and the check compares it."""
    if isinstance(data, np.ndarray):
        data = memoryview(np.ascontiguousarray(data)).cast("B")
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Segment:
    """One linear's arrays in the scratch file: name -> (offset, dtype, shape), and the digest of
    each array (``scales`` also as float16, the file's dtype with float16 activations)."""

    linear: str
    where: dict
    digests: dict


class IntegerSpill:
    """A scratch file the packed integers are appended to; removed by ``close`` (and with the
    output folder it lives in, if the compile fails)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "w+b")
        self._end = 0

    def put(self, linear: str, packed: PackedWeight) -> "SpilledWeight":
        where, digests = {}, {}
        for name in ARRAYS:
            tensor = getattr(packed, name)
            if tensor is None:
                continue
            array = tensor.numpy()
            self._file.seek(self._end)
            array.tofile(self._file)
            where[name] = (self._end, array.dtype.str, array.shape)
            digests[name] = digest(array)
            self._end += array.nbytes
        digests["scales16"] = digest(packed.scales.numpy().astype(np.float16))
        return SpilledWeight(self, (Segment(linear, where, digests),), packed.shape, packed.scheme)

    def read(self, offset: int, dtype: str, shape) -> np.ndarray:
        array = np.empty(shape, dtype=np.dtype(dtype))
        self._file.flush()
        self._file.seek(offset)
        if self._file.readinto(memoryview(array).cast("B")) != array.nbytes:
            raise RuntimeError(f"awq-graph bug: the integer scratch file {self.path} is shorter than written")
        return array

    @property
    def bytes_written(self) -> int:
        return self._end

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class SpilledWeight:
    """A ``PackedWeight`` whose arrays lie in an ``IntegerSpill``: the rows of one linear, or of
    several written as one (``concat_rows``); read back when asked."""

    spill: IntegerSpill
    segments: tuple[Segment, ...]
    shape: tuple[int, int]
    scheme: QuantScheme

    def array(self, name: str) -> np.ndarray | None:
        """``blob``, ``scales`` or ``zeros`` of every segment, rows in order (None: symmetric)."""
        if name not in self.segments[0].where:
            return None
        parts = [self.spill.read(*s.where[name]) for s in self.segments]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def packed(self) -> PackedWeight:
        zeros = self.array("zeros")
        return PackedWeight(torch.from_numpy(self.array("blob")), torch.from_numpy(self.array("scales")),
                            None if zeros is None else torch.from_numpy(zeros), self.shape, self.scheme)

    # what a QuantizedWeight answers, read back
    def unpack(self):
        return self.packed().unpack()

    @property
    def q(self) -> torch.Tensor:
        return self.packed().q

    @property
    def scale(self) -> torch.Tensor:
        return self.packed().scale

    @property
    def zero(self) -> torch.Tensor:
        return self.packed().zero

    def dequantize(self) -> torch.Tensor:
        return self.packed().dequantize()

    def to(self, device):
        return self.packed().to(device)

    def take_rows(self, index):
        return self.packed().take_rows(index)

    @staticmethod
    def concat_rows(parts: list["SpilledWeight"]) -> "SpilledWeight":
        first = parts[0]
        return SpilledWeight(first.spill, tuple(s for p in parts for s in p.segments),
                             (sum(p.shape[0] for p in parts), first.shape[1]), first.scheme)
