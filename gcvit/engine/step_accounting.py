"""Per-rank step accounting: where each rank's step goes (data, copy, compute, all-reduce wait); who is slow.

Every step each rank splits its time into four parts: waiting for the loader (`data`), the loader's
host-to-device copy (`copy`), forward + backward + optimizer (`compute`) and waiting for the other ranks in
the gradient all-reduce and the guard's collective (`comm`). On CPU host clocks measure them; on CUDA events
do, read only once they have completed (query(), never a wait), so a steady-state step gains no host sync.
The all-reduce wait starts when this rank's last gradient is ready (a post-accumulate hook on the parameter
that is ready last, found in the first step) and ends when backward returns, which DDP holds until the
all-reduce is done. DDP makes every rank's step as slow as the slowest, and the slow rank is the one that
waits least: a rank's own step time is its step less `comm`.

Steps that restart the loader or compile (skip()) are left out. At log steps report() brings each rank's
per-step means to rank 0 (one small all-gather), which names the slowest rank, its host and its dominant
cause, rolls the ranks up per node, and prints one WARN line when the same rank stays slow for the same
cause for `windows` log windows in a row.
"""
from __future__ import annotations

import contextlib
import functools
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from gcvit.engine import distributed

PARTS = ("data", "copy", "compute", "comm")
# What a rank slow in each part points at, alone or together with every rank of its node.
_ALONE = {"data": "its loader (workers, decode)", "copy": "its host-to-device link",
          "compute": "its GPU (clocks, thermals, a bad card)"}
_NODE = {"data": "that node's CPU or storage", "copy": "that node's PCIe or host memory",
         "compute": "that node's GPUs (power, cooling)"}


class _Events:
    """One step's CUDA events: start, end, around each batch fetch, gradients ready, reduced, collective."""

    def __init__(self) -> None:
        new = functools.partial(torch.cuda.Event, enable_timing=True)
        self.start, self.end, self.grads, self.reduced, self.coll0, self.coll1 = (new() for _ in range(6))
        self.fetch: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.spare: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.wait = 0.0  # the host's wait for the loader in this step (s)
        self.grads_seen = self.coll_seen = False

    def fetch_pair(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        pair = self.spare.pop() if self.spare else (torch.cuda.Event(enable_timing=True),
                                                     torch.cuda.Event(enable_timing=True))
        self.fetch.append(pair)
        return pair

    def parts(self) -> list[float]:
        """(data, copy, compute, comm) in seconds; the events have completed."""
        total = self.start.elapsed_time(self.end) / 1e3
        fetch = sum(a.elapsed_time(b) for a, b in self.fetch) / 1e3
        # The device idles between the events around a fetch while the host waits: that much is data wait,
        # the rest is the copy (and normalisation) the loader queued.
        data = min(self.wait, fetch)
        comm = (self.grads.elapsed_time(self.reduced) / 1e3 if self.grads_seen else 0.0) + \
            (self.coll0.elapsed_time(self.coll1) / 1e3 if self.coll_seen else 0.0)
        return [data, fetch - data, max(total - fetch - comm, 0.0), comm]

    def recycle(self) -> None:
        self.spare.extend(self.fetch)
        self.fetch.clear()
        self.wait, self.grads_seen, self.coll_seen = 0.0, False, False


class StepClock:
    """Accounts each training step of this rank; `phase` (optional) hears where the step is (heartbeat)."""

    def __init__(self, device: torch.device, phase: Callable[[str], None] | None = None, *,
                 ratio: float = 1.2, windows: int = 3) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.phase = phase or (lambda name: None)
        self.ratio, self.windows = ratio, windows
        self.sums, self.steps = [0.0] * len(PARTS), 0
        self._hooks: dict[int, Any] = {}
        self._last_ready: int | None = None
        self._pending: deque[_Events] = deque()  # CUDA: steps whose events are still running
        self._pool: list[_Events] = []
        self._ev: _Events | None = None
        self._t0 = self._wait = self._comm = 0.0
        self._grads_at: float | None = None
        self._hosts: list[str] | None = None
        self._streak: tuple[int, str] | None = None
        self._streak_len = 0
        self._skip = 0  # steps still to leave out (skip())

    # ---- inside a step (main thread; _grads_ready on autograd's thread)
    def watch(self, params: Iterable[torch.nn.Parameter]) -> StepClock:
        """Hook every trainable parameter; after the first step only the one whose gradient is ready last."""
        for i, p in enumerate(params):
            if p.requires_grad:
                self._hooks[i] = p.register_post_accumulate_grad_hook(functools.partial(self._grads_ready, i))
        return self

    def _grads_ready(self, index: int, param: torch.Tensor) -> None:
        self._last_ready = index
        self.phase("all-reduce")
        if self._ev is not None:
            self._ev.grads.record()
            self._ev.grads_seen = True
        else:
            self._grads_at = time.perf_counter()

    def skip(self, steps: int) -> None:
        """Leave the next `steps` steps out of the report: they restart the loader (a new epoch, after an
        evaluation) or compile, and would name whichever rank was slowest to warm up."""
        self._skip = steps

    def start(self) -> None:
        """A step begins."""
        if self.cuda:
            self._ev = self._pool.pop() if self._pool else _Events()
            self._ev.start.record()
        self._t0, self._wait, self._comm, self._grads_at = time.perf_counter(), 0.0, 0.0, None

    def next_batch(self, batches: Iterator[Any]) -> tuple[Any, float]:
        """The next batch and the seconds the host waited for it."""
        self.phase("loading")
        pair = self._ev.fetch_pair() if self._ev is not None else None
        if pair is not None:
            pair[0].record()
        tic = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - tic
        if pair is not None:
            pair[1].record()
        self._wait += waited
        self.phase("compute")
        return batch, waited

    def backward_done(self) -> None:
        """The last micro-batch's backward returned: DDP's all-reduce is done (queued, on CUDA)."""
        if self._ev is not None:
            self._ev.reduced.record()
        elif self._grads_at is not None:
            self._comm += time.perf_counter() - self._grads_at
        self.phase("compute")

    @contextlib.contextmanager
    def collective(self) -> Iterator[None]:
        """Around a collective all ranks enter each step (the guard's): its time is waiting for the others."""
        self.phase("all-reduce")
        if self._ev is not None:
            self._ev.coll0.record()
        tic = time.perf_counter()
        yield
        if self._ev is not None:
            self._ev.coll1.record()
            self._ev.coll_seen = True
        else:
            self._comm += time.perf_counter() - tic
        self.phase("compute")

    def finish(self) -> None:
        """The step's work is queued: account it (CUDA: once its events have run)."""
        if len(self._hooks) > 1 and self._last_ready is not None:  # calibrated: keep one hook
            for i, hook in self._hooks.items():
                if i != self._last_ready:
                    hook.remove()
            self._hooks = {self._last_ready: self._hooks[self._last_ready]}
        if self._skip:
            self._skip -= 1
            if self._ev is not None:
                self._ev.recycle()
                self._pool.append(self._ev)
                self._ev = None
        elif self._ev is not None:
            self._ev.end.record()
            self._ev.wait = self._wait
            self._pending.append(self._ev)
            self._ev = None
            self._drain()
        else:
            total = time.perf_counter() - self._t0
            self._add([self._wait, 0.0, max(total - self._wait - self._comm, 0.0), self._comm])
        self.phase("step boundary")

    def _add(self, parts: list[float]) -> None:
        self.sums = [s + p for s, p in zip(self.sums, parts)]
        self.steps += 1

    def _drain(self) -> None:
        """Account the CUDA steps whose events have completed (a query, never a wait)."""
        while self._pending and self._pending[0].end.query():
            ev = self._pending.popleft()
            self._add(ev.parts())
            ev.recycle()
            self._pool.append(ev)

    # ---- at log steps (a collective: every rank calls it)
    def report(self) -> dict[str, Any]:
        """Each rank's per-step means of this window, to rank 0: record fields there, {} elsewhere."""
        if self.cuda:
            self._drain()
        means = [s / self.steps for s in self.sums] if self.steps else [0.0] * len(PARTS)
        self.sums, self.steps = [0.0] * len(PARTS), 0
        active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self._hosts is None:
            self._hosts = [distributed.node_name()]
            if active:
                gathered: list[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, self._hosts[0])
                self._hosts = gathered
        rows = [means]
        if active:
            mine = torch.tensor(means, dtype=torch.float64, device=self.device if self.cuda else "cpu")
            table = mine.new_empty(dist.get_world_size(), len(PARTS))
            if self.cuda:  # NCCL: one all-gather (a gather is world - 1 point-to-point transfers into rank 0)
                dist.all_gather_into_tensor(table, mine)
            else:  # gloo: the same into the table's rows
                dist.all_gather(list(table.unbind()), mine)
            if dist.get_rank() != 0:
                return {}
            rows = table.tolist()
        fields = analyse(rows, self._hosts)
        if len(rows) == 1:  # nobody to compare with
            return {k: v for k, v in fields.items() if not k.startswith("slowest_")}
        warn = self._track(fields)
        if warn:
            print(warn, file=sys.stderr, flush=True)
        return fields

    def _track(self, f: dict[str, Any]) -> str | None:
        """The WARN line when the same rank has been slow for the same cause `windows` windows in a row."""
        slow = f.get("slowest_ratio", 0.0) >= self.ratio
        key = (f["slowest_rank"], f["slowest_cause"]) if slow else None
        self._streak_len = self._streak_len + 1 if key is not None and key == self._streak else int(slow)
        self._streak = key
        if self._streak_len != self.windows:  # once per streak
            return None
        return (f"WARN straggler for {self.windows} log window(s): rank {f['slowest_rank']} "
                f"({f['slowest_host']}) takes {f['slowest_ratio']:.2f}x the other ranks' median step, mostly "
                f"{f['slowest_cause']}; {f['slowest_hint']}")


def analyse(rows: list[list[float]], hosts: list[str]) -> dict[str, Any]:
    """Record fields from each rank's per-step (data, copy, compute, comm) seconds and host name."""
    own = [r[0] + r[1] + r[2] for r in rows]  # a rank's own step: all but waiting for the others
    slowest = max(range(len(rows)), key=own.__getitem__)
    # the slowest against the median of the others (of two ranks, the other one)
    others = [r for i, r in enumerate(rows) if i != slowest] or rows
    median = statistics.median(r[0] + r[1] + r[2] for r in others)
    typical = [statistics.median(r[i] for r in others) for i in range(3)]
    excess = [rows[slowest][i] - typical[i] for i in range(3)]
    cause = PARTS[max(range(3), key=excess.__getitem__)]
    nodes: dict[str, dict[str, Any]] = {}
    for rank, (host, row) in enumerate(zip(hosts, rows)):
        node = nodes.setdefault(host, {"ranks": []})
        node["ranks"].append(rank)
        for name, value in zip(PARTS, row):
            node[name] = node.get(name, 0.0) + value
    for node in nodes.values():
        for name in PARTS:
            node[name] /= len(node["ranks"])
    # The whole node is slow in the cause when each of its ranks exceeds the typical rank by half the
    # slowest's excess; one rank alone points at that rank's own device or loader.
    c = PARTS.index(cause)
    peers = nodes[hosts[slowest]]["ranks"]
    node_wide = len(peers) > 1 and all(rows[r][c] - typical[c] >= excess[c] / 2 for r in peers)
    hint = (f"all {len(peers)} ranks of {hosts[slowest]} are slow in {cause}: {_NODE[cause]}" if node_wide
            else f"the other ranks of {hosts[slowest]} are not: {_ALONE[cause]}" if len(peers) > 1
            else _ALONE[cause])
    return {"step_time_min": min(own), "step_time_median": statistics.median(own), "step_time_max": max(own),
            "slowest_rank": slowest, "slowest_host": hosts[slowest], "slowest_cause": cause,
            "slowest_ratio": own[slowest] / median if median > 0 else 1.0, "slowest_hint": hint,
            "nodes": nodes}
