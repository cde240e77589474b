"""Multi-rank faults through the real train.py (gloo): a data straggler and a compute straggler are named with
the right rank and cause (with the watchdog on, through warm-up, a checkpoint and the evaluation: no false
alarm), and a frozen rank (SIGSTOP) becomes a verdict, every live rank's stacks and exit 76 within the
configured deadline."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
from reliability_harness import start

from gcvit.engine.distributed import NODE_FAULT_EXIT_CODE

pytestmark = pytest.mark.slow
# Short deadlines, far above a tiny step even on a loaded machine.
WATCHED = ("debug=tiny", "trainer.stall_timeout=20", "trainer.stall_grace=120")


def train_records(run_dir: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "train"]


def test_a_data_and_a_compute_straggler_are_named_with_rank_node_and_cause(tmp_path: Path) -> None:
    """Rank 1 of 2 gets each batch 0.5 s late in one run, and spends 0.5 s more in each forward in the other:
    every log window after the first names rank 1 with `data`, then `compute` (the first holds the loader's
    start, which the step accounting leaves out, and whatever else a loaded machine does to one rank's
    first steps); one WARN line after 2 windows."""
    runs = {cause: start(tmp_path / cause, *WATCHED, "trainer.max_steps=6", "trainer.log_every_steps=2",
                         "trainer.ckpt_every_steps=2", "trainer.straggler_windows=2", nproc=2,
                         env={knob: "1:0.5"})
            for cause, knob in (("data", "GCVIT_TEST_SLOW_LOADER"), ("compute", "GCVIT_TEST_SLOW_FORWARD"))}
    host = socket.gethostname()
    for cause, run in runs.items():
        run.check(timeout=300)
        recs = train_records(run.run_dir)
        assert [r["step"] for r in recs] == [2, 4, 6]
        for r in recs[1:]:
            assert (r["slowest_rank"], r["slowest_host"], r["slowest_cause"]) == (1, host, cause), r
            assert r["slowest_ratio"] >= 1.2 and r["nodes"][host]["ranks"] == [0, 1]
            assert r["step_time_min"] <= r["step_time_median"] <= r["step_time_max"]
        # the fast rank waits for the slow one in the all-reduce: comm, not its own step
        assert recs[-1]["nodes"][host]["comm"] > 0.1
        warns = [ln for ln in run.err(0).splitlines() if ln.startswith("WARN straggler")]
        expected = (rf"WARN straggler for 2 log window\(s\): rank 1 \({host}\) takes [\d.]+x the other "
                    rf"ranks' median step, mostly {cause}; ")
        assert len(warns) == 1 and re.match(expected, warns[0]), run.err(0)[-3000:]
        assert not (run.run_dir / "hang").exists()  # warm-up, a checkpoint and an evaluation: no alarm


def test_a_frozen_rank_gets_a_verdict_stacks_and_a_node_fault_exit(tmp_path: Path) -> None:
    """SIGSTOP to rank 2 of 3 mid-run: ranks 0 and 1 wait in the all-reduce, notice no step for 8 s, write
    their stacks, one verdict naming rank 2 and its node, the blamed node for the launcher, and exit 76."""
    nodes_file = tmp_path / "fault-nodes"
    run = start(tmp_path / "run", "debug=tiny", "trainer.stall_timeout=8", "sched.epochs=50",
                "trainer.max_steps=1000", "trainer.log_every_steps=1", "trainer.ckpt_every_steps=0",
                "trainer.global_batch_size=24", nproc=3,
                env={"GCVIT_FAULT_NODES_FILE": str(nodes_file)})
    try:
        deadline = time.monotonic() + 240
        while not ((run.run_dir / "metrics.jsonl").is_file() and len(train_records(run.run_dir)) >= 4):
            alive = all(p.poll() is None for p in run.procs)
            assert alive and time.monotonic() < deadline, run.err(0)[-3000:]
            time.sleep(0.1)
        os.kill(run.procs[2].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        codes = [p.wait(timeout=120) for p in run.procs[:2]]
        took = time.monotonic() - stopped
    finally:
        run.kill()
    assert codes == [NODE_FAULT_EXIT_CODE] * 2, f"{codes}\n{run.err(0)[-3000:]}\n{run.err(1)[-3000:]}"
    (hang,) = (run.run_dir / "hang").iterdir()
    verdict = json.loads((hang / "verdict.json").read_text())
    host = socket.gethostname()
    # rank 2 is named; a live rank whose heartbeat a loaded machine held back for 5 s may be named with it
    assert 2 in verdict["silent"] and verdict["nodes"] == [host], verdict
    assert sorted(verdict["stuck"] + verdict["waiting"]) == [0, 1, 2] and verdict["waiting"]
    assert verdict["allowed_s"] == 8 and took < 8 + 60  # not the 30 min collective timeout
    line = (hang / "verdict.txt").read_text().strip()
    assert line.startswith("stall at step ") and f"2 ({host}) last seen in " in line
    # waiting in the step's all-reduce, or in the log step's collectives (log_every_steps=1)
    assert "(process frozen or node down); rank" in line and " waiting in " in line, line
    assert sum(line in run.err(r) for r in (0, 1)) == 1  # printed once, by the rank that noticed first
    for r in (0, 1):  # every live rank's Python stacks, with the main thread inside the epoch's steps
        stacks = (hang / f"stacks-rank{r}.txt").read_text()
        assert stacks.startswith(f"rank {r} on {host}") and "in run_epoch" in stacks, stacks[:2000]
    assert not (hang / "stacks-rank2.txt").exists()
    assert nodes_file.read_text() == f"{host}\n"
