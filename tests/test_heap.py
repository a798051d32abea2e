"""The search's large temporaries come from glibc's heap (``awq_graph.core.heap``), unless the
environment sets glibc's tunables itself; measured with glibc's own ``mallinfo2`` in a process
of its own (the settings are process-wide)."""
import os
import platform
import subprocess
import sys

import pytest

_PROBE = """
import ctypes, torch
from awq_graph.core.heap import heap_reused

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info

def mmapped_mb():
    return libc.mallinfo2().hblkhd >> 20

seen = []
for _ in range(2):
    with heap_reused():
        t = torch.empty(16 << 20)  # 64 MB, over glibc's largest mmap threshold
        t.fill_(1.0)
        seen.append(mmapped_mb())
        del t
t = torch.empty(16 << 20)
seen.append(mmapped_mb())
print(*seen)
"""


def _mmapped_mb(env) -> list[int]:
    run = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return [int(x) for x in run.stdout.split()]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's tunables")
def test_large_blocks_come_from_the_heap_inside_the_search_and_from_mmap_outside_it():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    inside_first, inside_again, outside = _mmapped_mb(env)
    assert inside_first < 64 and inside_again < 64, (inside_first, inside_again)  # measured 3 MB: torch's own
    assert outside >= 64, outside  # the defaults are back: 64 MB more mapped on its own (measured 67)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's tunables")
def test_glibc_tunables_in_the_environment_are_left_in_charge():
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, "MALLOC_ARENA_MAX": "2"}
    assert all(mb >= 64 for mb in _mmapped_mb(env))
