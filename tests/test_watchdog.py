"""The stall watchdog in process, on a clock the test moves: allowances per phase (no alarm while starting,
compiling, evaluating or saving), the verdict from heartbeats, and the stall path (stacks, one verdict, the
exit code); the frozen-rank test with real ranks is in test_trainer_faults.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gcvit.engine.distributed import BUG_EXIT_CODE, NODE_FAULT_EXIT_CODE
from gcvit.engine.watchdog import FLOOR_S, WARM_STEPS, Watchdog, ranks_text, verdict


class Clock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def dog(tmp_path: Path, clock: Clock, rank: int = 0, world: int = 1, exits: list[int] | None = None,
        timeout: float | None = None) -> Watchdog:
    sink = exits if exits is not None else []
    return Watchdog(tmp_path, "L1", rank, world, timeout=timeout, grace=300, clock=clock, exit=sink.append)


def steps(w: Watchdog, clock: Clock, n: int, dt: float) -> None:
    for _ in range(n):
        for phase in ("loading", "compute", "all-reduce", "step boundary"):
            w.enter(phase)
        clock.now += dt
        w.completed(w.step + 1)


def test_allowance_is_grace_while_starting_evaluating_saving_then_a_multiple_of_the_median_step(
        tmp_path: Path) -> None:
    clock = Clock()
    w = dog(tmp_path, clock)
    assert w.allowed() == 300  # startup: compilation, the loader's first batches
    steps(w, clock, WARM_STEPS, dt=200)  # slow first steps (compilation) are no alarm and not the median
    assert w.allowed() == 300 and not w.durations
    steps(w, clock, 5, dt=40)
    assert w.allowed() == 4 * 40
    steps(w, clock, 10, dt=1)
    assert w.allowed() == FLOOR_S  # fast steps: the floor
    for phase in ("eval", "checkpoint"):
        w.enter(phase)
        assert w.allowed() == 300
    w.enter("loading")  # back to training: the first step may restart the loader
    assert w.allowed() == 300
    steps(w, clock, 1, dt=1)
    assert w.allowed() == FLOOR_S
    assert dog(tmp_path, clock, timeout=7).timeout == 7 and not dog(tmp_path, clock, timeout=0).enabled


def test_no_alarm_while_progress_stays_within_the_allowance(tmp_path: Path) -> None:
    clock, exits = Clock(), []
    w = dog(tmp_path, clock, exits=exits, timeout=10)
    w.beats_dir.mkdir()
    w.enter("eval")
    clock.now += 299  # a long evaluation
    w.check()
    w.enter("checkpoint")
    clock.now += 299  # and a long save
    w.check()
    steps(w, clock, WARM_STEPS + 3, dt=9)
    w.check()
    assert exits == [] and not (tmp_path / "hang").exists()


def test_verdict_names_the_stuck_rank_its_node_and_where_it_was_seen() -> None:
    now = 5000.0

    def hb(rank: int, phase: str, since: float, beat: float, host: str = "node-a", step: int = 1233) -> dict:
        return {"rank": rank, "host": host, "phase": phase, "since": since, "beat": beat, "step": step}

    beats = {r: hb(r, "all-reduce", now - 300, now - 1) for r in range(8)}
    beats[5] = hb(5, "loading", now - 312, now - 1, host="node-b")
    v = verdict(beats, 8, now, silent_after=10)
    assert v["line"] == ("stall at step 1234: rank 5 (node-b) last seen in the data loader 312 s ago; "
                         "ranks 0-4, 6-7 waiting in all-reduce")
    assert v["nodes"] == ["node-b"] and v["stuck"] == [5] and v["code"] == NODE_FAULT_EXIT_CODE
    # a frozen process stops beating, whatever phase it was in
    beats[5] = hb(5, "all-reduce", now - 40, now - 40, host="node-b")
    v = verdict(beats, 8, now, silent_after=10)
    assert "rank 5 (node-b) last seen in all-reduce 40 s ago, silent for 40 s (process frozen or node down)" \
        in v["line"] and v["code"] == NODE_FAULT_EXIT_CODE
    # everybody stuck alike: nothing to pin on a node
    v = verdict({r: hb(r, "loading", now - 100, now - 1) for r in range(2)}, 2, now, silent_after=10)
    assert v["code"] == BUG_EXIT_CODE and v["nodes"] == [] and "no single rank to blame" in v["line"]
    assert ranks_text([7, 0, 1, 2, 4]) == "0-2, 4, 7"


def test_a_stall_dumps_stacks_writes_one_verdict_and_exits_with_its_code(tmp_path: Path,
                                                                       capfd: pytest.CaptureFixture) -> None:
    clock, exits0, exits1 = Clock(), [], []
    ranks = [dog(tmp_path, clock, r, world=2, exits=e, timeout=10) for r, e in enumerate((exits0, exits1))]
    for w in ranks:
        w.start()
        w.stop()  # the test ticks by hand
        steps(w, clock, WARM_STEPS + 2, dt=1)
    ranks[0].enter("all-reduce")
    ranks[1].enter("loading")
    ranks[1].beat()
    clock.now += 11
    ranks[0].check()  # rank 0 notices first; rank 1's beat is too old to wait for its dump
    assert exits0 == [NODE_FAULT_EXIT_CODE]
    hang = tmp_path / "hang" / "L1"
    v = json.loads((hang / "verdict.json").read_text())
    assert v["stuck"] == [1] and v["noticed_by"] == 0
    assert (hang / "verdict.txt").read_text().startswith("stall at step 5: rank 1 (")
    assert "last seen in the data loader" in capfd.readouterr().err
    ranks[1].check()  # rank 1 finds the verdict: it dumps and exits with the same code, verdict unchanged
    assert exits1 == [NODE_FAULT_EXIT_CODE] and json.loads((hang / "verdict.json").read_text()) == v
    for r in (0, 1):
        stacks = (hang / f"stacks-rank{r}.txt").read_text()
        assert f"rank {r} on " in stacks and "in check" in stacks  # faulthandler's frames of this thread
