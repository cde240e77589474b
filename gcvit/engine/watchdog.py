"""Stall watchdog: per-rank heartbeats in the run directory; a hang becomes stacks, a verdict, an exit code.

Each rank's main thread only records where it is (step and phase: a few attribute writes). Two daemon
threads per rank do the rest, so that a stalled file system cannot keep the stall from being noticed: a
writer beats every tick (RUN_DIR/heartbeats/rank-N.json, shared by all nodes like the checkpoints; a
counter `seq` that grows with each beat) and looks out for another rank's verdict; a judge, touching no
file, checks every tick that a step completed within the allowed time: `timeout` seconds (auto: what keeps
the whole verdict within max(GOAL_FLOOR_S, GOAL_STEPS median steps) of the last step), or at least `grace`
while starting up or compiling (the first WARM_STEPS steps after a start), evaluating or saving a checkpoint
(and the step after). Files rather than the process group's store: with srun the store lives inside rank 0,
which may be the rank that froze.

On a stall every live rank writes its Python stacks (faulthandler) and, on NCCL, the flight recorder into
RUN_DIR/hang/<launch>/. A rank that noticed reads every heartbeat twice, `silent_after()` apart on its own
monotonic clock (a heartbeat whose counter did not move belongs to a frozen or dead process: no other
node's wall clock is trusted), and writes verdict.json (gcvit.engine.stall_verdict; one exclusive link:
exactly one rank wins), prints its line, waits for the other live ranks' dumps and exits with the verdict's
code; ranks that see a verdict dump and exit with its code. All this file I/O runs in a thread given
io_bound_s(): past it the rank prints what it knows to stderr and exits all the same.
"""
from __future__ import annotations

import faulthandler
import itertools
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
from gcvit.engine.distributed import STALL_EXIT_CODE, DistEnv
from gcvit.engine.stall_verdict import FR_PREFIX, recorder_blame, verdict

# The goal: a frozen rank ends the job within max(2 min, 5 median steps) of its last step. The auto
# allowance is that less everything that follows it (overhead_s()), so the goal holds by construction.
GOAL_FLOOR_S, GOAL_STEPS = 120.0, 5.0
# Steps after a start that still get `grace` (compilation); after an evaluation or a save only the next step
# does (the loader may restart for a new epoch).
WARM_STEPS = 2
LONG = ("startup", "eval", "checkpoint")  # phases allowed `grace`
FR_DUMP_S = 5.0  # the NCCL flight recorder's dump gets this long (it can hang with a broken communicator)
IO_SLACK_S = 5.0  # writing stacks and the verdict, beyond the waits
# A file the launcher names (launch/slurm.sbatch): the winning rank writes the blamed nodes there, one a line,
# so that the requeued job excludes them.
FAULT_NODES_ENV = "GCVIT_FAULT_NODES_FILE"
FR_DUMP_FILE_ENV = ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")  # torch 2.9+, older


def watch(run_dir: Path, env: DistEnv, timeout: float | None, grace: float) -> Watchdog:
    """This rank's started watchdog for a (re)start of the run in `run_dir` (a collective: the ranks agree
    on the launch's name, so each restart gets its own RUN_DIR/hang/<launch>/)."""
    launch = distributed.broadcast_object(time.strftime("%Y%m%dT%H%M%S") if env.is_main else None)
    return Watchdog(run_dir, launch, env.rank, env.world_size, timeout=timeout, grace=grace,
                    nccl=env.distributed and env.device.type == "cuda").start()


class Watchdog:
    """Heartbeat and stall detection of one rank; `timeout` None = auto, 0 = off (no threads, no files).
    `clock` (monotonic), `sleep` and `exit` are replaceable for tests."""

    def __init__(self, run_dir: Path, launch: str, rank: int, world: int, *, timeout: float | None,
                 grace: float, nccl: bool = False, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, exit: Callable[[int], None] = os._exit) -> None:
        self.beats_dir, self.hang_dir = run_dir / "heartbeats", run_dir / "hang" / launch
        self.launch, self.rank, self.world = launch, rank, world
        self.timeout, self.grace, self.nccl = timeout, grace, nccl
        self.clock, self._sleep, self._exit = clock, sleep, exit
        self.host, self.pid = distributed.node_name(), os.getpid()
        self.step, self.phase = 0, "startup"
        self.since = self.progress_at = clock()
        self.warm = 0  # steps completed since the last start or long phase
        self.durations: deque[float] = deque(maxlen=50)
        self.dumped = False
        self._seq = itertools.count()
        self._last_good: dict[int, dict[str, Any]] = {}  # each rank's last readable heartbeat
        self._unread: set[int] = set()  # ranks whose heartbeat could not be read in the last pass
        self._silent: dict[int, float] = {}
        self._stop = threading.Event()
        self._stalled = threading.Event()  # set while this rank dumps and exits
        self._verdict_seen = threading.Event()  # the writer found another rank's verdict

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

    # ---- how long things may take
    def tick_s(self) -> float:
        """How often to beat and check: a tenth of min(grace, timeout or GOAL_FLOOR_S / 2), 1-15 s."""
        base = min(self.grace, self.timeout or GOAL_FLOOR_S / 2)
        return min(max(base / 10, 1.0), 15.0)

    def silent_after(self) -> float:
        """A heartbeat unchanged this long belongs to a frozen or dead process (a live one beats every tick;
        three ticks leave room for a loaded machine)."""
        return 3 * self.tick_s() + 2

    def dump_wait_s(self) -> float:
        """How long the verdict's rank waits for the other live ranks' dumps (they notice within a tick)."""
        return 2 * self.tick_s() + 5

    def io_bound_s(self) -> float:
        """Everything after noticing a stall: own dump, the two reads of the heartbeats, the others' dumps."""
        return (FR_DUMP_S if self.nccl else 0.0) + self.silent_after() + self.dump_wait_s() + IO_SLACK_S

    def overhead_s(self) -> float:
        """From the allowance running out to the exit, at most: the tick that notices, then the I/O."""
        return self.tick_s() + self.io_bound_s()

    def allowed(self) -> float:
        """Seconds this rank may go without progress in its current phase."""
        steady = self.timeout
        if steady is None and self.durations:
            steady = max(GOAL_FLOOR_S, GOAL_STEPS * statistics.median(self.durations)) - self.overhead_s()
        if self.phase in LONG or self.warm < WARM_STEPS or steady is None:
            return max(self.grace, steady or 0.0)  # a grace shorter than the steady allowance is no grace
        return steady

    # ---- threads
    def start(self) -> Watchdog:
        """Write the first heartbeat and start the threads (unless off). On NCCL the flight recorder's own
        dump at a collective timeout goes into RUN_DIR/hang/ unless TORCH_FR_DUMP_TEMP_FILE or its older
        name is set (torch reads it when it dumps)."""
        if self.nccl and not set(FR_DUMP_FILE_ENV) & os.environ.keys():
            self.hang_dir.parent.mkdir(parents=True, exist_ok=True)
            os.environ[FR_DUMP_FILE_ENV[0]] = str(self.hang_dir.parent / "nccl-timeout-rank")
        if self.enabled:
            self.beats_dir.mkdir(parents=True, exist_ok=True)
            self.beat()
            for name, loop in (("writer", self._write_loop), ("judge", self._judge_loop)):
                threading.Thread(target=loop, name=f"gcvit-watchdog-{name}", daemon=True).start()
        return self

    def stop(self) -> None:
        """End the threads; while the judge is handling a stall, wait for it to end the process instead (a
        main thread that failed meanwhile, e.g. a collective broken by a rank that already exited, must not
        exit first with another code)."""
        if self._stalled.is_set():
            threading.Event().wait()
        self._stop.set()

    def _write_loop(self) -> None:
        found = self.hang_dir / "verdict.json"
        while not self._stop.wait(self.tick_s()):
            try:
                self.beat()
                if found.exists():
                    self._verdict_seen.set()
            except OSError as e:  # a file system hiccup: the judge goes on; the others may see us silent
                print(f"watchdog: rank {self.rank} wrote no heartbeat: {e}", file=sys.stderr, flush=True)

    def _judge_loop(self) -> None:
        while not self._stop.wait(self.tick_s()):
            self.check()

    def check(self) -> None:
        """One tick of the judge (no file I/O): on a verdict another rank wrote, or with no step within the
        allowance, dump and judge in a thread bounded by io_bound_s(), then end the process."""
        seen = self._verdict_seen.is_set()
        if not seen and self.clock() - self.progress_at <= self.allowed():
            return
        self._stalled.set()
        idle = self.clock() - self.progress_at
        # a verdict that cannot be read or written (a stalled file system) still ends the job: requeue as is
        outcome: dict[str, Any] = {"code": STALL_EXIT_CODE, "line": f"no step for {idle:.0f} s"}
        worker = threading.Thread(target=self._handle, args=(not seen, outcome), name="gcvit-watchdog-io",
                                  daemon=True)
        worker.start()
        worker.join(self.io_bound_s())
        try:
            if worker.is_alive():
                print(f"watchdog: rank {self.rank}: {outcome['line']}; writing stacks or the verdict into "
                      f"{self.hang_dir} did not finish within {self.io_bound_s():.0f} s (file system "
                      f"stalled?); exiting {outcome['code']}", file=sys.stderr, flush=True)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            self._stop.set()
            self._exit(outcome["code"])

    # ---- file I/O (the writer thread, or the judge's bounded worker)
    def beat(self) -> None:
        """Write this rank's heartbeat (atomically: a reader never sees half a file). `age`: seconds in its
        phase, on this rank's own clock."""
        hb = {"launch": self.launch, "rank": self.rank, "host": self.host, "pid": self.pid,
              "seq": next(self._seq), "step": self.step, "phase": self.phase,
              "age": self.clock() - self.since, "dumped": self.dumped}
        path = self.beats_dir / f"rank-{self.rank}.json"
        tmp = path.with_suffix(f".tmp{self.pid}-{threading.get_ident()}")  # writer and worker may both beat
        tmp.write_text(json.dumps(hb))
        os.replace(tmp, path)

    def beats(self) -> dict[int, dict[str, Any]]:
        """Every rank's heartbeat of this launch; one that cannot be read now (ESTALE, replaced while read)
        is its last good one, and the rank is not judged silent on it."""
        out, self._unread = {}, set()
        for rank in range(self.world):
            try:
                hb = json.loads((self.beats_dir / f"rank-{rank}.json").read_text())
            except (OSError, ValueError):
                hb = self._last_good.get(rank)
                if hb is not None:
                    self._unread.add(rank)
            if hb is not None and hb.get("launch") == self.launch:
                out[rank] = self._last_good[rank] = hb
        return out

    def _handle(self, judge: bool, outcome: dict[str, Any]) -> None:
        """Dump; judge unless a verdict is out; wait for the others' dumps; take the verdict's code."""
        found = self.hang_dir / "verdict.json"
        try:
            self.hang_dir.mkdir(parents=True, exist_ok=True)
            self._dump()
            if judge and not found.exists():
                v = self._judge()
                outcome.update(code=v["code"], line=v["line"])
                self._publish(v, found)
                self._await_dumps()
            outcome["code"] = json.loads(found.read_text())["code"]
        except OSError as e:  # the run directory is unwritable: end the job all the same, and say why
            print(f"watchdog: rank {self.rank}: {outcome['line']}; could not write its stacks or the verdict "
                  f"({e}); exiting {outcome['code']}", file=sys.stderr, flush=True)

    def _judge(self) -> dict[str, Any]:
        """The verdict from two reads of the heartbeats, silent_after() apart on this rank's clock."""
        first = self.beats()
        t0 = self.clock()
        self._sleep(self.silent_after())
        second = self.beats()
        waited = self.clock() - t0
        unchanged = [r for r, hb in second.items() if first.get(r, {}).get("seq") == hb["seq"]]
        self._silent = {r: waited for r in unchanged if r != self.rank and r not in self._unread}
        blamed = recorder_blame(self.hang_dir) if self.nccl else []
        v = verdict(second, self.world, self._silent, blamed)
        v.update(noticed_by=self.rank, allowed_s=self.allowed())
        return v

    def _publish(self, v: dict[str, Any], path: Path) -> None:
        """Write the verdict unless another rank did first; print its line if this rank's won."""
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
        """This rank's Python stacks and, on NCCL, its flight recorder (given FR_DUMP_S: it can hang)."""
        with open(self.hang_dir / f"stacks-rank{self.rank}.txt", "w") as f:
            f.write(f"rank {self.rank} on {self.host} (pid {self.pid}), step {self.step}, {self.phase}\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        if self.nccl:
            recorder = threading.Thread(target=self._dump_recorder, name="gcvit-watchdog-fr", daemon=True)
            recorder.start()
            recorder.join(FR_DUMP_S)
            if recorder.is_alive():
                print(f"watchdog: rank {self.rank}: the NCCL flight recorder's dump did not finish within "
                      f"{FR_DUMP_S:.0f} s; going on without it", file=sys.stderr, flush=True)
        self.dumped = True
        self.beat()

    def _dump_recorder(self) -> None:
        try:
            from torch._C._distributed_c10d import _dump_nccl_trace  # the recorder's pickled entries

            # <prefix><rank>, as torch's analyser reads them (torch.distributed.flight_recorder.fr_trace)
            (self.hang_dir / f"{FR_PREFIX}{self.rank}").write_bytes(_dump_nccl_trace())
        except Exception as e:  # a dump that fails must not keep the job from exiting
            print(f"watchdog: no NCCL flight recorder dump on rank {self.rank}: {e}", file=sys.stderr)

    def _await_dumps(self) -> None:
        """Until every rank that still beats has dumped too (bounded: a rank may die meanwhile)."""
        deadline = self.clock() + self.dump_wait_s()
        while self.clock() < deadline:
            beats = self.beats()
            if all(hb["dumped"] for r, hb in beats.items() if r not in self._silent):
                return
            self._sleep(min(self.tick_s(), 1.0))
