"""Stall watchdog: per-rank heartbeats in the run directory; a hang becomes stacks, a verdict, an exit code.

Each rank's main thread only records where it is (step and phase: a few attribute writes); a daemon thread
per rank writes that as a heartbeat file (RUN_DIR/heartbeats/rank-N.json, shared by all nodes like the
checkpoints) and checks that a step completed within the allowed time: `timeout` seconds (auto: 4 x the
median step, at least FLOOR_S), or `grace` seconds while starting up or compiling (the first WARM_STEPS
steps after a start), evaluating or saving a checkpoint (and the step after). Files rather than the process
group's store: with srun the store lives inside rank 0, which may be the rank that froze.

On a stall every live rank writes its Python stacks (faulthandler) and, on NCCL, the flight recorder into
RUN_DIR/hang/<launch>/; the first rank to notice reads every heartbeat and writes verdict.json (one
exclusive link: exactly one rank wins) and prints one line naming the rank, its node and where it was last
seen. Ranks that see a verdict dump at once. Each waits until every live rank has dumped, then exits with
the verdict's code: NODE_FAULT_EXIT_CODE when some ranks are stuck or silent while the others wait for them,
BUG_EXIT_CODE when all are stuck alike (nothing to blame on a node).
"""
from __future__ import annotations

import faulthandler
import json
import os
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gcvit.engine import distributed
from gcvit.engine.distributed import BUG_EXIT_CODE, NODE_FAULT_EXIT_CODE, DistEnv

FLOOR_S = 75.0  # auto timeout never below this: a slow log step or a GC pause must not end a job
STEP_FACTOR = 4.0  # auto timeout: this many median steps
# Steps after a start that still get `grace` (compilation); after an evaluation or a save only the next step
# does (the loader may restart for a new epoch).
WARM_STEPS = 2
LONG = ("startup", "eval", "checkpoint")  # phases allowed `grace`
WAITING = ("all-reduce", "step boundary")  # phases in which a rank waits for the others
# A file the launcher names (launch/slurm.sbatch): the winning rank writes the blamed nodes there, one a line,
# so that the requeued job excludes them.
FAULT_NODES_ENV = "GCVIT_FAULT_NODES_FILE"
FR_DUMP_FILE_ENV = ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")  # torch 2.9+, older
_WHERE = {"loading": "the data loader", "compute": "forward/backward", "all-reduce": "all-reduce",
          "step boundary": "the step boundary", "startup": "startup", "eval": "evaluation",
          "checkpoint": "a checkpoint save"}


def ranks_text(ranks: list[int]) -> str:
    """[0, 1, 2, 4, 6, 7] -> '0-2, 4, 6-7'."""
    spans: list[list[int]] = []
    for r in sorted(ranks):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def verdict(beats: dict[int, dict[str, Any]], world: int, now: float, silent_after: float) -> dict[str, Any]:
    """Who the job waits for, from every rank's last heartbeat (a rank without one never started)."""
    stuck, waiting, lines = [], [], []
    for rank in range(world):
        hb = beats.get(rank)
        if hb is None:
            stuck.append(rank)
            lines.append(f"rank {rank} never sent a heartbeat")
            continue
        silent = now - hb["beat"] > silent_after
        if hb["phase"] in WAITING and not silent:
            waiting.append(rank)
            continue
        stuck.append(rank)
        where = f"rank {rank} ({hb['host']}) last seen in {_WHERE.get(hb['phase'], hb['phase'])} " \
                f"{now - hb['since']:.0f} s ago"
        lines.append(where + (f", silent for {now - hb['beat']:.0f} s (process frozen or node down)"
                              if silent else ""))
    # the step the waiting ranks are in (their beats are fresh; a silent rank's may be a tick old)
    steps = [beats[r]["step"] for r in waiting] or [hb["step"] for hb in beats.values()]
    at = min(steps) + 1 if steps else 0
    if waiting:
        where = "all-reduce" if all(beats[r]["phase"] == "all-reduce" for r in waiting) else "collectives"
        lines.append(f"rank{'s' if len(waiting) > 1 else ''} {ranks_text(waiting)} waiting in {where}")
    blame = bool(stuck) and bool(waiting)
    nodes = sorted({beats[r]["host"] for r in stuck if r in beats}) if blame else []
    if not blame:
        lines.append("no single rank to blame (shared storage, the network or a deadlock in the code)")
    return {"step": at, "stuck": stuck, "waiting": waiting, "nodes": nodes,
            "code": NODE_FAULT_EXIT_CODE if blame else BUG_EXIT_CODE,
            "line": f"stall at step {at}: " + "; ".join(lines)}


def watch(run_dir: Path, env: DistEnv, timeout: float | None, grace: float) -> Watchdog:
    """This rank's started watchdog for a (re)start of the run in `run_dir` (a collective: the ranks agree
    on the launch's name, so each restart gets its own RUN_DIR/hang/<launch>/)."""
    launch = distributed.broadcast_object(time.strftime("%Y%m%dT%H%M%S") if env.is_main else None)
    return Watchdog(run_dir, launch, env.rank, env.world_size, timeout=timeout, grace=grace,
                    nccl=env.distributed and env.device.type == "cuda").start()


class Watchdog:
    """Heartbeat and stall detection of one rank; `timeout` None = auto, 0 = off (no thread, no files)."""

    def __init__(self, run_dir: Path, launch: str, rank: int, world: int, *, timeout: float | None,
                 grace: float, nccl: bool = False, clock: Callable[[], float] = time.time,
                 exit: Callable[[int], None] = os._exit) -> None:
        self.beats_dir, self.hang_dir = run_dir / "heartbeats", run_dir / "hang" / launch
        self.launch, self.rank, self.world = launch, rank, world
        self.timeout, self.grace, self.nccl = timeout, grace, nccl
        self.clock, self._exit = clock, exit
        self.host, self.pid = distributed.node_name(), os.getpid()
        self.step, self.phase = 0, "startup"
        self.since = self.progress_at = clock()
        self.warm = 0  # steps completed since the last start or long phase
        self.durations: deque[float] = deque(maxlen=50)
        self.dumped = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stalled = threading.Event()  # set while this rank dumps and exits

    @property
    def enabled(self) -> bool:
        return self.timeout != 0

    # ---- main thread: where this rank is (cheap: no I/O)
    def enter(self, phase: str) -> None:
        """This rank is now in `phase`; entering or leaving a long phase restarts the clock."""
        now = self.clock()
        if phase in LONG or self.phase in LONG:
            self.progress_at, self.warm = now, min(self.warm, WARM_STEPS - 1)
        self.phase, self.since = phase, now

    def completed(self, step: int) -> None:
        """Optimizer step `step` is done on this rank."""
        now = self.clock()
        if self.warm >= WARM_STEPS:
            self.durations.append(now - self.progress_at)
        self.step, self.progress_at, self.warm = step, now, self.warm + 1

    # ---- the watchdog thread
    def allowed(self) -> float:
        """Seconds this rank may go without progress in its current phase."""
        if self.phase in LONG or self.warm < WARM_STEPS:
            return self.grace
        if self.timeout is not None:
            return self.timeout
        if not self.durations:
            return self.grace
        return max(FLOOR_S, STEP_FACTOR * statistics.median(self.durations))

    def tick_s(self) -> float:
        """How often to beat and check: a tenth of the smallest allowance, 1-15 s."""
        base = min(self.grace, self.timeout or FLOOR_S)
        return min(max(base / 10, 1.0), 15.0)

    def silent_after(self) -> float:
        """A heartbeat older than this belongs to a frozen or dead process (a live one beats every tick)."""
        return 2 * self.tick_s() + 2

    def start(self) -> Watchdog:
        """Write the first heartbeat and start the thread (unless off). On NCCL the flight recorder's own
        dump at a collective timeout goes into RUN_DIR/hang/ unless TORCH_FR_DUMP_TEMP_FILE or its older
        name is set (torch reads it when it dumps)."""
        if self.nccl and not set(FR_DUMP_FILE_ENV) & os.environ.keys():
            self.hang_dir.parent.mkdir(parents=True, exist_ok=True)
            os.environ[FR_DUMP_FILE_ENV[0]] = str(self.hang_dir.parent / "nccl-timeout-rank")
        if self.enabled:
            self.beats_dir.mkdir(parents=True, exist_ok=True)
            self.beat()
            self._thread = threading.Thread(target=self._run, name="gcvit-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """End the thread; while it is handling a stall, wait for it to end the process instead (a main thread
        that failed meanwhile, e.g. a collective broken by a rank that already exited, must not exit first
        with another code)."""
        if self._stalled.is_set():
            threading.Event().wait()
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s()):
            self.check()

    def beat(self) -> None:
        """Write this rank's heartbeat (atomically: a reader never sees half a file)."""
        hb = {"launch": self.launch, "rank": self.rank, "host": self.host, "pid": self.pid, "step": self.step,
              "phase": self.phase, "since": self.since, "beat": self.clock(), "dumped": self.dumped}
        path = self.beats_dir / f"rank-{self.rank}.json"
        tmp = path.with_suffix(f".tmp{self.pid}")
        tmp.write_text(json.dumps(hb))
        os.replace(tmp, path)

    def beats(self) -> dict[int, dict[str, Any]]:
        """Every rank's heartbeat of this launch."""
        out = {}
        for path in self.beats_dir.glob("rank-*.json"):
            try:
                hb = json.loads(path.read_text())
            except (OSError, ValueError):  # replaced while read: the next tick reads it
                continue
            if hb.get("launch") == self.launch:
                out[hb["rank"]] = hb
        return out

    def check(self) -> None:
        """One tick: beat, then act on a verdict (another rank's or our own)."""
        try:
            self.beat()
        except OSError as e:  # a file system hiccup must not stop the stall check; the others see us silent
            print(f"watchdog: rank {self.rank} wrote no heartbeat: {e}", file=sys.stderr, flush=True)
        found = self.hang_dir / "verdict.json"
        if not found.exists() and self.clock() - self.progress_at <= self.allowed():
            return
        self._stalled.set()
        code = BUG_EXIT_CODE  # if the verdict cannot be read (a failing file system), still end the job
        try:
            self.hang_dir.mkdir(parents=True, exist_ok=True)
            if not found.exists():
                self._judge(found)
            self._dump()
            self._await_dumps()
            code = json.loads(found.read_text())["code"]
        except OSError as e:  # the run directory is unwritable: end the job all the same, and say why
            print(f"watchdog: rank {self.rank} saw no step for {self.clock() - self.progress_at:.0f} s and "
                  f"could not write its verdict or stacks ({e}); exiting {code}", file=sys.stderr, flush=True)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            self._stop.set()
            self._exit(code)

    def _judge(self, path: Path) -> None:
        """Write the verdict unless another rank did first; print its line if this rank's won."""
        v = verdict(self.beats(), self.world, self.clock(), silent_after=self.silent_after())
        v.update(noticed_by=self.rank, allowed_s=self.allowed())
        tmp = self.hang_dir / f"verdict.tmp{self.rank}"
        tmp.write_text(json.dumps(v, indent=1) + "\n")
        try:
            os.link(tmp, path)  # exclusive: the first rank's verdict stays
        except FileExistsError:
            return
        finally:
            tmp.unlink()
        (self.hang_dir / "verdict.txt").write_text(v["line"] + "\n")
        if v["nodes"] and os.environ.get(FAULT_NODES_ENV):
            Path(os.environ[FAULT_NODES_ENV]).write_text("".join(f"{n}\n" for n in v["nodes"]))
        print(f"{v['line']} (stacks in {self.hang_dir}; exit {v['code']})", file=sys.stderr, flush=True)

    def _dump(self) -> None:
        """This rank's Python stacks and, on NCCL, its flight recorder."""
        with open(self.hang_dir / f"stacks-rank{self.rank}.txt", "w") as f:
            f.write(f"rank {self.rank} on {self.host} (pid {self.pid}), step {self.step}, {self.phase}\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        if self.nccl:
            try:
                from torch._C._distributed_c10d import _dump_nccl_trace  # the recorder's pickled entries

                # <prefix><rank>, as torch's analyser reads them (torch.distributed.flight_recorder.fr_trace)
                (self.hang_dir / f"nccl-trace-rank{self.rank}").write_bytes(_dump_nccl_trace())
            except Exception as e:  # a dump that fails must not keep the job from exiting
                print(f"watchdog: no NCCL flight recorder dump on rank {self.rank}: {e}", file=sys.stderr)
        self.dumped = True
        self.beat()

    def _await_dumps(self) -> None:
        """Until every rank that still beats has dumped too (bounded: a rank may die meanwhile)."""
        tick = self.tick_s()
        deadline = time.monotonic() + 2 * tick + 5
        while time.monotonic() < deadline:
            now = self.clock()
            live = [hb for hb in self.beats().values() if now - hb["beat"] <= self.silent_after()]
            if all(hb["dumped"] for hb in live):
                return
            time.sleep(min(tick, 1.0))
