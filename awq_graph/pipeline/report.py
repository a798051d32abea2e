"""report.json: built from the stages' records, with each stage's seconds and peak RSS."""
from __future__ import annotations

import math
import resource
import time
from dataclasses import asdict

from ..core.ranks import Ranks
from ..emit import FUSED
from ..search import SearchResult
from ..interrupt import checkpoint
from .options import CompileOptions


def ranks_report(ranks: Ranks, calib_ids, opts: CompileOptions) -> dict:
    """How many processes shared the calibration, and the samples each ran."""
    n = 0 if calib_ids is None else int(calib_ids.shape[0])
    shares = [len(range(r, n, ranks.world)) for r in range(ranks.world)]
    backend = None
    if ranks.group is not None:
        import torch.distributed as dist

        backend = str(dist.get_backend(ranks.group))
    return {"world": ranks.world, "backend": backend, "samples_per_rank": None if opts.rtn_only else shares,
            "bytes_summed": ranks.traffic["summed"], "bytes_gathered": ranks.traffic["gathered"],
            "bytes_broadcast": ranks.traffic["broadcast"]}


class Laps:
    """Seconds per stage, in the order the stages ran; a stage's end is where a signal that a
    finalizer swallowed stops the run (``interrupt.checkpoint``)."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}  # the process's peak so far, at the end of each stage
        self._t = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(now - self._t, 3)
        self.peak_rss_mb[stage] = peak_rss_mb()
        self._t = now
        checkpoint()


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def reset_device_peak(device: str) -> None:
    """Start ``device_peak_mb``'s count afresh (a CUDA ``device``; nothing on the CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def device_peak_mb(device: str) -> float | None:
    """The most memory torch's allocator held on a CUDA ``device`` since ``reset_device_peak``
    (None for the CPU, whose peak is the process's RSS)."""
    if not device.startswith("cuda"):
        return None
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def finite(value):
    """The report with every NaN or inf float as null (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def search_report(result: SearchResult, opts: CompileOptions, n_q: int, timings, calib_ids, skipped) -> dict:
    """The search's part of report.json: the scheme and method, per group its scale's record, per
    linear its clipping's, the groups skipped, the held-aside check's verdicts."""
    return {
        "scheme": opts.scheme.name,
        "method": "rtn" if opts.rtn_only else ("awq+clip" if opts.clip else "awq") + ("+gptq" if opts.rounding == "gptq" else ""),
        "quantized_linears": n_q,
        "calibration": None if calib_ids is None else {"samples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1])},
        "timings_s": timings,
        "search_s": round(result.seconds, 3),
        "device": opts.device,
        "grid_screen": None if opts.rtn_only else (opts.search_options().linear_screen or "off"),
        "grid_points": None if opts.rtn_only else opts.grid_points,
        "groups": [asdict(g) for g in result.groups],
        "clipping": [asdict(c) for c in result.clips],
        "rounding": [asdict(r) for r in result.roundings],
        "skipped_groups": [s.to_json() for s in skipped],
        "held_aside_check": None if result.guard is None else {**asdict(result.guard), "summary": result.guard.summary()},
    }


def graph_report(emitted, opts: CompileOptions, runtime_files: list[str]) -> dict:
    """The graph written (its kind and check, ``Emitted``) and how."""
    return {"kind": emitted.kind, "act_dtype": opts.act_dtype, "accuracy_level": opts.accuracy_level,
            "lm_head_bits": opts.lm_head_bits if opts.quantize_lm_head else None,
            "table_bits": opts.table_scheme.bits if opts.quantize_lm_head and emitted.kind == FUSED else None,
            **{k: v for k, v in asdict(emitted).items() if k not in ("kind", "quantized_linears", "warnings")},
            "runtime_files": runtime_files}


def memory_report(lap: Laps, device: str) -> dict:
    return {"peak_rss_mb": peak_rss_mb(),
            "device_peak_mb": device_peak_mb(device),  # the search's GPU memory; None on the CPU
            "peak_rss_mb_after": lap.peak_rss_mb}  # where the peak grows, stage by stage
