"""The processes one compile runs on: data-parallel calibration over torch.distributed.

Each rank counts a disjoint share of the calibration samples in the statistics of the layer being
searched; the statistics are sums over tokens (sum |x|, H = X^T X, token counts), so the ranks add
theirs up (``sum``) and every rank holds the whole set's. The direct form's rows (chosen when there are
fewer tokens than channels) are gathered instead (``gather_rows``). Every rank runs the whole loss
subsample (a few sequences), so every loss, a subgraph's output error or a single linear's from
the summed H or the gathered rows, is the same on every rank: the ranks share the grid points out
and add up the vector of losses. Every decision is rank 0's (``from_leader``), so a float that
rounded differently on another rank cannot split them. ``Ranks()`` is one process: every method returns what it was given.

A rank that fails leaves its one-line error in the rendezvous store (``fail``) and closes its
connections; the others, waiting in a collective, see the connection close and raise that line as
their own (``RankFailed``), so every rank's stderr names the rank at fault and why.

Where a rank waits for the others outside the search (``wait``: every rank ready, rank 0's OUT in
place) it polls the store in Python rather than blocking in a barrier, so that SIGTERM and Ctrl-C
end it within a fraction of a second; each rank beats a counter in the store from a thread, and a
waiting rank gives up with one line when a peer's beat has stopped for ``rank_timeout_s()`` (a rank
killed, stopped or cut off), however long a live peer takes (rank 0 writing a large model).
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import AwqGraphError

FAILED_KEY = "awq_graph/failed"
SEEN_KEY = "awq_graph/failure_seen"
WAIT_FOR_PEERS_S = 10.0  # how long a failing rank waits for the others to read its error
BEAT_S = 1.0  # how often a rank beats its counter in the store
POLL_S = 0.05


def rank_timeout_s() -> float:
    """How long a rank waits for a silent peer (or for the others to join): AWQ_GRAPH_RANK_TIMEOUT
    seconds, 600 by default."""
    try:
        value = float(os.environ.get("AWQ_GRAPH_RANK_TIMEOUT", "600"))
    except ValueError:
        raise AwqGraphError(f"AWQ_GRAPH_RANK_TIMEOUT={os.environ['AWQ_GRAPH_RANK_TIMEOUT']} is not a number of "
                            "seconds") from None
    if not value > 0:
        raise AwqGraphError(f"AWQ_GRAPH_RANK_TIMEOUT={value:g}: give a positive number of seconds")
    return value


class RankFailed(AwqGraphError):
    """An error every rank raises with the same line: another rank's failure (its own line, with
    its rank), or a fault every rank sees (ranks that read different calibration)."""


@dataclass(frozen=True)
class Ranks:
    """``group``: a torch.distributed process group (None: one process). ``store``: the
    rendezvous store, where a failing rank leaves its error (None: the others say only that a
    rank stopped)."""

    group: Any = None
    store: Any = None
    # what this rank sent: the payload bytes of its all-reduces ("summed"), all-gathers and broadcasts
    traffic: dict = field(default_factory=lambda: {"summed": 0, "gathered": 0, "broadcast": 0}, compare=False,
                          repr=False)
    _waits: list = field(default_factory=lambda: [0], compare=False, repr=False)  # this rank's wait() calls

    def __post_init__(self):
        if self.group is not None and self.store is not None:
            threading.Thread(target=self._beat, name="awq-graph-rank-beat", daemon=True).start()

    def _beat(self) -> None:
        """This rank is alive: its counter in the store grows while the process runs."""
        key = f"awq_graph/alive/{self.rank}"
        while True:
            try:
                self.store.add(key, 1)
            except Exception:  # the store is gone (its host, rank 0, ended): nobody to tell
                return
            time.sleep(BEAT_S)

    @property
    def world(self) -> int:
        return 1 if self.group is None else _dist().get_world_size(self.group)

    @property
    def rank(self) -> int:
        return 0 if self.group is None else _dist().get_rank(self.group)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, items: torch.Tensor) -> torch.Tensor:
        """This rank's share of ``items`` (every world-th, from its rank): disjoint, and together all."""
        return items[self.rank::self.world]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (and returned)."""
        if self.group is not None:
            self._collective(lambda d: d.all_reduce(tensor, op=d.ReduceOp.SUM, group=self.group))
            self.traffic["summed"] += tensor.numel() * tensor.element_size()
        return tensor

    def total(self, number: float) -> float:
        """A number summed over the ranks (float64 on the way)."""
        if self.group is None:
            return number
        return float(self.sum(torch.tensor([float(number)], dtype=torch.float64, device=self._device()))[0])

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's ``rows`` (n_r, C), one after the other in rank order."""
        if self.group is None:
            return rows
        counts = [int(n) for n in self.gather(int(rows.shape[0]))]
        on = rows.to(self._device())
        padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=on.device)
        padded[:rows.shape[0]] = on
        parts = [torch.empty_like(padded) for _ in counts]
        self._collective(lambda d: d.all_gather(parts, padded, group=self.group))
        self.traffic["gathered"] += padded.numel() * padded.element_size()
        return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(rows.device)

    def from_leader(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank, in place (and returned)."""
        if self.group is not None:
            src = _dist().get_global_rank(self.group, 0)
            self._collective(lambda d: d.broadcast(tensor, src=src, group=self.group))
            self.traffic["broadcast"] += tensor.numel() * tensor.element_size()
        return tensor

    def agreed_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks, as rank 0 has the sum (a decision made from it is the
        same on every rank); a new CPU tensor."""
        if self.group is None:
            return values
        on = values.to(self._device()).contiguous()
        return self.from_leader(self.sum(on)).cpu()

    def leader_object(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank."""
        return self.object_from(0, value)

    def object_from(self, rank: int, value):
        """Rank ``rank``'s ``value`` (picklable: tensors go as they are) on every rank."""
        if self.group is None:
            return value
        box = [value]
        src = _dist().get_global_rank(self.group, rank)
        self._collective(lambda d: d.broadcast_object_list(box, src=src, group=self.group, device=self._device()))
        return box[0]

    def gather(self, value) -> list:
        """Every rank's ``value``, in rank order."""
        if self.group is None:
            return [value]
        out = [None] * self.world
        self._collective(lambda d: d.all_gather_object(out, value, group=self.group))
        return out

    def wait(self) -> None:
        """Until every rank is here (or one failed: then its error; or a peer fell silent for
        ``rank_timeout_s``). Signals end it at once: the store is polled from Python."""
        if self.group is None:
            return
        if self.store is None:
            self._collective(lambda d: d.barrier(group=self.group))
            return
        self._waits[0] += 1
        key = f"awq_graph/wait/{self._waits[0]}"
        timeout = rank_timeout_s()
        heard = {r: (-1, time.monotonic()) for r in range(self.world) if r != self.rank}
        try:
            self.store.add(key, 1)
            while self.store.add(key, 0) < self.world:
                if self.store.check([FAILED_KEY]):
                    raise RankFailed(self._peer_error())
                now = time.monotonic()
                for peer, (count, since) in heard.items():
                    beats = self.store.add(f"awq_graph/alive/{peer}", 0)
                    if beats != count:
                        heard[peer] = (beats, now)
                    elif now - since > timeout:
                        raise RankFailed(f"rank {peer} fell silent: no sign of it for {timeout:.0f} s (killed, stopped "
                                         "or cut off; AWQ_GRAPH_RANK_TIMEOUT sets the wait, in seconds)")
                time.sleep(POLL_S)
        except RankFailed:
            raise
        except Exception as exc:  # the store's host, rank 0, is gone
            raise RankFailed(self._peer_error()) from exc

    def fail(self, message: str) -> None:
        """This rank failed with ``message``: leave it for the others, close this rank's connections
        (so that the others' collectives end now, not at the timeout) and give them a moment to read it."""
        if self.group is None:
            return
        if self.store is not None:
            try:
                self.store.set(FAILED_KEY, f"rank {self.rank}: {message}")
            except Exception:  # the store is gone with its host (rank 0): the others say a rank stopped
                pass
        try:
            _dist().destroy_process_group(self.group)
        except Exception:
            pass
        if self.store is None:
            return
        deadline = time.monotonic() + WAIT_FOR_PEERS_S
        while time.monotonic() < deadline:  # rank 0 hosts the store: it stays until the others have read
            try:
                if self.store.add(SEEN_KEY, 0) >= self.world - 1:
                    time.sleep(0.5)  # and to print it, before a launcher ends them for this rank's exit
                    return
            except Exception:
                return
            time.sleep(0.05)

    def _collective(self, call) -> None:
        try:
            call(_dist())
        except RuntimeError as exc:  # a peer closed its connections: it failed
            raise RankFailed(self._peer_error()) from exc

    def _peer_error(self) -> str:
        if self.store is not None:
            try:
                if self.store.check([FAILED_KEY]):
                    message = self.store.get(FAILED_KEY).decode()
                    self.store.add(SEEN_KEY, 1)
                    return message
            except Exception:
                pass
        return "another rank ended without leaving its error (killed, or rank 0, which hosts the store, is gone)"

    def _device(self):
        backend = _dist().get_backend(self.group)
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _dist():
    import torch.distributed as dist

    return dist


ONE = Ranks()
