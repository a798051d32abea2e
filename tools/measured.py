"""One command of a benchmark run alone and measured: its wall seconds, the load average before it,
and its peak RSS, the largest resident set of any process in its tree (getrusage of the children,
taken by a small Python parent of its own, so that the figure is that command's alone; what
``/usr/bin/time -v`` reports, without needing that program: the GPU machines lent here lack it).

    from measured import run_measured
    run = run_measured([sys.executable, "-m", "awq_graph.cli", "compile", ...], env=env)
    run.proc.returncode, run.wall_s, run.peak_rss_gb, run.load_avg

``file_sha256(path)``: what a run wrote, as a digest (two codes' outputs compared byte for byte).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# the parent: runs the command with the same standard streams, then writes its children's peak RSS (KiB
# on Linux) to the file named first, and exits with the command's status
_PARENT = ("import resource, subprocess, sys\n"
           "rc = subprocess.call(sys.argv[2:])\n"
           "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
           "sys.exit(rc)\n")


@dataclass(frozen=True)
class Measured:
    proc: subprocess.CompletedProcess
    wall_s: float
    peak_rss_gb: float | None  # None where the command could not be started
    load_avg: float            # the 1-minute load average just before it


def run_measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> Measured:
    """``cmd`` in a process of its own (stdout and stderr captured as text), measured."""
    with tempfile.TemporaryDirectory(prefix="measured-") as scratch:
        peak_file = Path(scratch) / "peak_rss_kb"
        load = os.getloadavg()[0]
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _PARENT, str(peak_file), *cmd], env=env, cwd=cwd,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t
        peak_kb = int(peak_file.read_text()) if peak_file.exists() else None
    return Measured(proc, round(wall, 1), None if peak_kb is None else round(peak_kb / 2**20, 2), round(load, 2))


def file_sha256(path: Path) -> str | None:
    """The file's SHA-256, read 16 MiB at a time; None when there is no such file."""
    if not path.exists():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
