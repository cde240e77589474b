"""The stall watchdog in process, on a clock the test moves: allowances per phase (no alarm while starting,
compiling, evaluating or saving; the goal's bound by construction), the verdict from heartbeats and from
flight-recorder dumps, silence judged on the judging rank's own clock, and the stall path (stacks, one
verdict, the exit code, a stalled file system); the frozen-rank test with real ranks is in
test_trainer_faults.py."""
from __future__ import annotations

import json
import pickle
import threading
from pathlib import Path

import pytest

from gcvit.engine import watchdog as wd
from gcvit.engine.distributed import BUG_EXIT_CODE, NODE_FAULT_EXIT_CODE, STALL_EXIT_CODE
from gcvit.engine.stall_verdict import FR_PREFIX, never_started, ranks_text, recorder_blame, verdict
from gcvit.engine.watchdog import GOAL_FLOOR_S, GOAL_STEPS, WARM_STEPS, Watchdog


class Clock:
    """Time that moves only when the test says so; sleeping moves it and lets `live` dogs beat."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.live: list[Watchdog] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        for w in self.live:
            w.beat()


def dog(tmp_path: Path, clock: Clock, rank: int = 0, world: int = 1, exits: list[int] | None = None,
        timeout: float | None = None, grace: float = 300, nccl: bool = False) -> Watchdog:
    sink = exits if exits is not None else []
    return Watchdog(tmp_path, "L1", rank, world, timeout=timeout, grace=grace, nccl=nccl, clock=clock,
                    sleep=clock.sleep, exit=sink.append)


def steps(w: Watchdog, clock: Clock, n: int, dt: float) -> None:
    for _ in range(n):
        for phase in ("loading", "compute", "all-reduce", "step boundary"):
            w.enter(phase)
        clock.now += dt
        w.completed(w.step + 1)


def test_allowance_is_grace_while_starting_evaluating_saving_then_keeps_the_goal(tmp_path: Path) -> None:
    clock = Clock()
    w = dog(tmp_path, clock)
    assert w.allowed() == 300  # startup: compilation, the loader's first batches
    steps(w, clock, WARM_STEPS, dt=200)  # slow first steps (compilation) are no alarm and not the median
    assert w.allowed() == 300 and not w.durations
    # auto: the allowance plus all that follows it (a tick, the dumps, the verdict) is the goal, no more
    steps(w, clock, 5, dt=40)
    assert w.allowed() + w.overhead_s() == GOAL_STEPS * 40
    steps(w, clock, 10, dt=1)
    assert w.allowed() + w.overhead_s() == GOAL_FLOOR_S  # fast steps: 2 minutes in all
    assert w.overhead_s() == w.tick_s() + w.silent_after() + w.dump_wait_s() + wd.IO_SLACK_S
    for phase in ("eval", "checkpoint"):
        w.enter(phase)
        assert w.allowed() == 300
    w.enter("loading")  # back to training: the first step may restart the loader
    assert w.allowed() == 300
    steps(w, clock, 1, dt=1)
    assert w.allowed() == GOAL_FLOOR_S - w.overhead_s()
    assert dog(tmp_path, clock, timeout=7).timeout == 7 and not dog(tmp_path, clock, timeout=0).enabled
    long = dog(tmp_path, clock, timeout=400, grace=60)  # a grace shorter than the timeout is no grace
    long.enter("eval")
    assert long.allowed() == 400


def test_no_alarm_while_progress_stays_within_the_allowance(tmp_path: Path) -> None:
    clock, exits = Clock(), []
    w = dog(tmp_path, clock, exits=exits, timeout=10)
    w.enter("eval")
    clock.now += 299  # a long evaluation
    w.check()
    w.enter("checkpoint")
    clock.now += 299  # and a long save
    w.check()
    steps(w, clock, WARM_STEPS + 3, dt=9)
    w.check()
    assert exits == [] and not (tmp_path / "hang").exists()


def hb(rank: int, phase: str, age: float, host: str = "node-a", step: int = 1233) -> dict:
    return {"rank": rank, "host": host, "phase": phase, "age": age, "step": step, "seq": 7}


def test_verdict_names_the_stuck_rank_its_node_and_where_it_was_seen() -> None:
    beats = {r: hb(r, "all-reduce", 300) for r in range(8)}
    beats[5] = hb(5, "loading", 312, host="node-b")
    v = verdict(beats, 8, {})
    assert v["line"] == ("stall at step 1234: rank 5 (node-b) last seen in the data loader 312 s ago; "
                         "ranks 0-4, 6-7 waiting in all-reduce")
    assert v["nodes"] == ["node-b"] and v["stuck"] == [5] and v["code"] == NODE_FAULT_EXIT_CODE
    # a frozen process stops beating, whatever phase it was in: its age grows by the silence seen
    beats[5] = hb(5, "all-reduce", 20, host="node-b")
    v = verdict(beats, 8, {5: 20.0})
    assert "rank 5 (node-b) last seen in all-reduce 40 s ago, silent for 20 s (process frozen or node down)" \
        in v["line"] and v["code"] == NODE_FAULT_EXIT_CODE and v["silent"] == [5]
    # every rank stuck alike outside a collective: nothing to pin on a node, a restart would repeat it
    v = verdict({r: hb(r, "loading", 100) for r in range(2)}, 2, {})
    assert v["code"] == BUG_EXIT_CODE and v["nodes"] == [] and "no single rank to blame" in v["line"]
    # every rank waiting in a collective (an NCCL hang, a dead NIC): requeue as is
    v = verdict({r: hb(r, "step boundary", 100) for r in range(4)}, 4, {})
    assert v["code"] == STALL_EXIT_CODE and v["stuck"] == [] and v["nodes"] == []
    assert "ranks 0-3 waiting in collectives; every rank waits in a collective, no rank to blame" in v["line"]
    # ...unless the flight recorder shows a rank whose newest collective never started
    v = verdict({r: hb(r, "step boundary", 100, host=f"node-{r // 2}") for r in range(4)}, 4, {}, [3])
    assert v["code"] == NODE_FAULT_EXIT_CODE and v["stuck"] == [3] and v["nodes"] == ["node-1"]
    assert v["line"].startswith("stall at step 1234: rank 3 (node-1) never started its newest collective")
    assert ranks_text([7, 0, 1, 2, 4]) == "0-2, 4, 7"


def test_a_failed_switch_makes_one_clause_per_node_not_one_per_rank() -> None:
    beats = {r: hb(r, "all-reduce", 280, host=f"node-{'abcdefghij'[r // 8]}") for r in range(80)}
    v = verdict(beats, 80, {r: 20.0 for r in range(8, 80)})
    assert v["line"].startswith("stall at step 1234: ranks 8-15 (node-b) last seen in all-reduce 300 s ago, "
                                "silent for 20 s (process frozen or node down); ranks 16-23 (node-c) ")
    assert v["line"].endswith("3 more group(s) in verdict.json; ranks 0-7 waiting in all-reduce")
    assert v["stuck"] == list(range(8, 80)) and len(v["nodes"]) == 9


def entry(seq: int, state: str, pg: str = "0") -> dict:
    return {"collective_seq_id": seq, "state": state, "process_group": (pg, "default_pg"),
            "profiling_name": "nccl:all_reduce"}


def test_the_flight_recorder_points_at_the_rank_whose_newest_collective_never_started(tmp_path: Path) -> None:
    started = {"entries": [entry(11, "completed"), entry(12, "started"), entry(40, "scheduled", pg="1")]}
    assert never_started({0: started, 1: started, 2: {"entries": [entry(11, "completed"),
                                                                   entry(12, "scheduled")]}}) == [2]
    assert never_started({0: started, 1: {"entries": [entry(11, "started")]}}) == [1]  # never issued #12
    assert never_started({0: started, 1: started}) == []  # all started: the network, not a rank
    for rank, dump in enumerate((started, started, {"entries": [entry(12, "scheduled")]})):
        (tmp_path / f"{FR_PREFIX}{rank}").write_bytes(pickle.dumps(dump))
    (tmp_path / f"{FR_PREFIX}3").write_bytes(pickle.dumps(started)[:20])  # a rank that died while dumping
    assert recorder_blame(tmp_path) == [2]


def test_a_frozen_rank_is_judged_on_the_judges_clock_and_gets_one_verdict(
        tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """Rank 1 of 3 freezes inside the all-reduce (its phase says waiting, its heartbeat stops); rank 2 waits
    and beats on. Rank 0 notices first: stacks, one verdict naming rank 1 only, exit 76; rank 2 then finds
    the verdict and exits with the same code."""
    clock, exits = Clock(), [[], [], []]
    ranks = [dog(tmp_path, clock, r, world=3, exits=exits[r], timeout=10) for r in range(3)]
    for w in ranks:
        w.start()
        w.stop()  # the test ticks by hand
        steps(w, clock, WARM_STEPS + 2, dt=1)
        w.enter("all-reduce")
        w.beat()
    clock.live = [ranks[0], ranks[2]]
    clock.now += 11
    ranks[0].check()
    assert exits[0] == [NODE_FAULT_EXIT_CODE]
    hang = tmp_path / "hang" / "L1"
    v = json.loads((hang / "verdict.json").read_text())
    assert (v["stuck"], v["waiting"], v["noticed_by"]) == ([1], [0, 2], 0)
    assert (hang / "verdict.txt").read_text().startswith("stall at step 5: rank 1 (")
    assert "silent for " in capfd.readouterr().err
    ranks[2].check()  # past its allowance too: it finds the verdict, dumps and exits with its code
    assert exits[2] == [NODE_FAULT_EXIT_CODE] and json.loads((hang / "verdict.json").read_text()) == v
    for r in (0, 2):
        stacks = (hang / f"stacks-rank{r}.txt").read_text()
        assert f"rank {r} on " in stacks and "in _handle" in stacks  # faulthandler's frames of this thread


def test_an_unreadable_heartbeat_reuses_the_last_good_one_and_is_not_silent(tmp_path: Path) -> None:
    clock = Clock()
    judge, other = (dog(tmp_path, clock, r, world=2, timeout=10) for r in range(2))
    for w in (judge, other):
        w.beats_dir.mkdir(exist_ok=True)
        w.enter("all-reduce")
        w.beat()
    first = judge.beats()
    (other.beats_dir / "rank-1.json").write_text('{"launch": "L1", "ran')  # ESTALE or a partial read
    assert judge.beats()[1] == first[1] and judge._unread == {1}
    v = judge._judge()
    assert v["silent"] == [] and v["code"] == STALL_EXIT_CODE


def test_a_stalled_file_system_cannot_keep_the_job_from_ending(tmp_path: Path, monkeypatch,
                                                              capfd: pytest.CaptureFixture) -> None:
    """Writing stacks hangs (an NFS server gone): the judge still exits within its bound, with a line;
    a flight-recorder dump that hangs is given FR_DUMP_S."""
    clock, exits = Clock(), []
    w = dog(tmp_path, clock, exits=exits, timeout=10)
    blocked = threading.Event()
    monkeypatch.setattr(w, "_dump", lambda: blocked.wait())
    monkeypatch.setattr(w, "io_bound_s", lambda: 0.2)
    steps(w, clock, WARM_STEPS, dt=1)
    clock.now += 11
    w.check()  # its I/O thread stays blocked (a daemon), as on a dead mount
    assert exits == [STALL_EXIT_CODE]
    assert "did not finish within 0 s (file system stalled?); exiting 77" in capfd.readouterr().err
    monkeypatch.setattr(wd, "FR_DUMP_S", 0.1)
    nccl = dog(tmp_path, clock, nccl=True)
    nccl.beats_dir.mkdir(exist_ok=True)
    nccl.hang_dir.mkdir(parents=True, exist_ok=True)
    hung = threading.Event()
    monkeypatch.setattr(nccl, "_dump_recorder", hung.wait)
    nccl._dump()
    hung.set()
    assert nccl.dumped and "flight recorder's dump did not finish within 0 s" in capfd.readouterr().err
