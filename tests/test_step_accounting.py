"""Step accounting on CPU in process: each part of a step lands in its own bucket (host clocks), the report
names the slowest rank, its cause and whether its whole node is slow, and a straggler gets one WARN line
per streak; the multi-rank runs that name an injected straggler are in test_trainer_faults.py."""
from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from gcvit.engine.step_accounting import StepClock, analyse


def slow_batches(delay: float) -> Iterator[torch.Tensor]:
    while True:
        time.sleep(delay)
        yield torch.randn(4, 8)


def test_each_part_of_a_step_lands_in_its_bucket_and_the_phases_follow_the_step() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    phases: list[str] = []
    clock = StepClock(torch.device("cpu"), phases.append).watch(model.parameters())
    batches = slow_batches(0.05)
    clock.skip(1)  # as at an epoch's start: the loader's first batch is no step's cost
    for _ in range(3):
        clock.start()
        x, waited = clock.next_batch(batches)
        model(x).sum().backward()
        time.sleep(0.03)  # what DDP's all-reduce wait looks like on the host: after the last gradient
        clock.backward_done()
        with clock.collective():
            time.sleep(0.02)
        clock.finish()
        assert waited >= 0.05
    # after the first step one hook is left: the first layer's weight, whose gradient is ready last
    assert list(clock._hooks) == [0]
    assert phases[:6] == ["loading", "compute", "all-reduce", "all-reduce", "all-reduce", "all-reduce"]
    assert phases[-5:] == ["all-reduce", "compute", "all-reduce", "compute", "step boundary"]
    assert clock.steps == 2  # the skipped step is left out
    fields = clock.report()
    (node,) = fields["nodes"].values()
    assert node["ranks"] == [0]
    assert node["data"] >= 0.05 and node["comm"] >= 0.05 and node["copy"] == 0.0
    assert node["compute"] < node["data"]  # a tiny model: the sleeps dominate, each in its own bucket
    assert clock.steps == 0  # a new window


def test_the_report_names_the_slowest_rank_its_cause_and_its_node() -> None:
    # (data, copy, compute, comm) per step; DDP equalises the steps, so the slow rank waits least
    fast = [0.01, 0.0, 0.30, 0.20]
    rows = [fast, fast, [0.21, 0.0, 0.30, 0.0], fast]
    f = analyse(rows, ["a", "a", "b", "b"])
    assert (f["slowest_rank"], f["slowest_host"], f["slowest_cause"]) == (2, "b", "data")
    assert f["step_time_min"] == pytest.approx(0.31) and f["step_time_max"] == pytest.approx(0.51)
    assert f["step_time_median"] == pytest.approx(0.31) and f["slowest_ratio"] == pytest.approx(0.51 / 0.31)
    assert f["slowest_hint"] == "the other ranks of b are not: its loader (workers, decode)"
    assert f["nodes"]["b"]["ranks"] == [2, 3] and f["nodes"]["b"]["data"] == pytest.approx(0.11)
    # both ranks of node b slow in compute: the node, not one GPU
    slow = [0.01, 0.0, 0.50, 0.0]
    f = analyse([fast, fast, slow, slow], ["a", "a", "b", "b"])
    assert f["slowest_cause"] == "compute"
    assert f["slowest_hint"].startswith("all 2 ranks of b are slow in compute")


def test_a_straggler_gets_one_warn_line_after_the_configured_windows(capfd: pytest.CaptureFixture) -> None:
    clock = StepClock(torch.device("cpu"), ratio=1.2, windows=2)
    slow = analyse([[0.0, 0.0, 0.3, 0.3], [0.0, 0.0, 0.6, 0.0]], ["a", "b"])
    even = analyse([[0.0, 0.0, 0.3, 0.0], [0.0, 0.0, 0.3, 0.0]], ["a", "b"])
    warns = [clock._track(f) for f in (slow, even, slow, slow, slow, slow)]
    assert [w is not None for w in warns] == [False, False, False, True, False, False]
    assert warns[3].startswith("WARN straggler for 2 log window(s): rank 1 (b) takes 2.00x the other ranks' "
                               "median step, mostly compute; its GPU")
