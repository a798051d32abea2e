"""How glibc's malloc serves a compile: its large blocks mapped on their own while weights stream
(``give_back_freed_memory``, ``trim_heap``), and taken from the heap, reused, inside the search
(``heap_reused``). Process-wide settings; nothing happens where the C library is not glibc.

Streaming: by default glibc's mmap threshold follows the largest block freed so far, so once a
layer's weights are freed the next layer's land on the heap, whose freed holes the process keeps:
peak RSS would grow by one layer per layer. Mapped on their own from ``MMAP_THRESHOLD`` up, freed
weights go back to the OS.

The search makes and drops the same large tensors over and over: every grid point quantizes a
layer's weights anew and multiplies them by the calibration rows. Each mapped block is a fresh
mmap, whose pages the kernel faults in and zeroes at first touch and unmaps when freed, so that
kernel work becomes a large share of the search. Inside ``heap_reused`` no block is mapped and
freed ones stay on the heap to be reused: faster, for a peak RSS a few hundred MB higher that grows
slowly with depth (docs/scale.md has the figures); on leaving, glibc's defaults come back and the
heap is trimmed, and the layers still leave memory as they finish (``ParamStore.release`` trims).
Any mallopt turns glibc's moving mmap threshold off for good, so after the search a compile of a
model in memory (``stream=False``) maps its blocks from 128 KB up where glibc would have raised the
threshold; emission measured no slower for it, so it is left as it is.
``heap_reused`` leaves glibc alone where the environment sets one of its ``MALLOC_*`` tunables
(the caller has chosen how memory is handed out: the depth tests map every block over 64 KB on
its own, to measure what is live).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from contextlib import contextmanager

# mallopt's parameters (malloc.h) and glibc's defaults
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
MMAP_THRESHOLD = 4 << 20  # blocks mapped on their own while weights stream
_KEPT_FREE = 1 << 30  # inside the search: the free top of the heap kept for reuse, at most


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc's own symbol: not musl, not macOS
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


def give_back_freed_memory() -> bool:
    """Have glibc's malloc map every allocation of ``MMAP_THRESHOLD`` and more on its own, so that
    freeing it gives the memory back. Returns whether it took effect."""
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) if _LIBC else False


def trim_heap() -> None:
    """Return the heap's free holes to the OS (glibc's malloc_trim). The threshold above does
    not always hold (in some runs, varying with the hash seed, weights land on the heap anyway and
    their freed memory stays with the process), so a read of a large tensor trims first, and so
    does ``ParamStore.release``."""
    if _LIBC:
        _LIBC.malloc_trim(0)


@contextmanager
def heap_reused():
    """Large allocations from glibc's heap and kept there when freed, for the block's duration."""
    libc = None if any(name.startswith("MALLOC_") for name in os.environ) else _LIBC
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, _KEPT_FREE)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
