"""How glibc's malloc serves a compile: its large blocks mapped on their own while weights stream
(``give_back_freed_memory``, ``trim_heap``), and taken from the heap, reused, inside the search
(``heap_reused``). Process-wide settings; nothing happens where the C library is not glibc.

Streaming: by default glibc's mmap threshold follows the largest block freed so far (up to 32 MB),
so once a layer's weights are freed the next layer's land on the heap, whose freed holes the
process keeps: peak RSS grew by one float32 layer per layer. Mapped on their own from 4 MB up,
freed weights go back to the OS.

The search makes and drops the same large tensors over and over: every grid point quantizes a
layer's weights anew and multiplies them by the calibration rows, each tensor tens of MB. Each
mapped block is a fresh mmap, whose pages the kernel faults in and zeroes one by one at first
touch, and unmaps when freed: on Llama-3.2-1B's width at 16 x 512 that kernel work was 46.8 of a
2-layer compile's 140 CPU seconds. Inside ``heap_reused`` no block is mapped and freed ones stay on the
heap to be reused (search 69.0 -> 48.4 s, kernel time 46.8 -> 10.8 s, peak RSS 2.34 -> 2.74 GB
on 2 such layers); on leaving, glibc's defaults come back and the heap is trimmed. Its cost in depth
(the 1B width at 16 x 512): peak RSS 2.56 / 2.70 / 2.78 / 3.02 GiB at 2 / 4 / 8 / 16 layers, where
without it 2.21 GiB at 8 and 2.20 at 16, 1.34-1.42x slower; the kept free top (1 GB or 256 MB) makes
no difference: the large blocks on the heap do.
The layers still leave memory as they finish: ``ParamStore.release`` trims the heap. Any mallopt
turns glibc's moving mmap threshold off for good, so after the search a compile of a model in
memory (``--no-stream``) maps its blocks from 128 KB up where glibc would have raised the
threshold; measured on the 1B width (2 layers, AWQ 2 x 64, ``--no-stream``): emit 5.3-5.6 s
against 5.7-5.8 s with the threshold set to glibc's dynamic ceiling (32 MB) after the search,
peak RSS the same within 3%: left as it is.
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
    """Have glibc's malloc map every allocation of 4 MB and more on its own, so that freeing it
    gives the memory back (measured: 6 layers of 63 MB each, +460 MB over the trace without it,
    +63 MB with it). Returns whether it took effect."""
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) if _LIBC else False


def trim_heap() -> None:
    """Return the heap's free holes to the OS (glibc's malloc_trim). The threshold above does
    not always hold: in about one run in three (it varies with the hash seed) the weights landed
    on the heap anyway and 235 MB of freed memory stayed with the process over 6 layers of 63 MB
    (measured: RssAnon 564 MB, 329 MB after a trim), so a read of a large tensor trims first,
    and so does ``ParamStore.release``."""
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
