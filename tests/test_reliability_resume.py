"""Proofs through the real train.py (CPU, gloo, DALI cpu on generated JPEGs, tiny GC ViT).

Bitwise resume after SIGKILL (inside the write of `last`, and in the middle of gradient accumulation,
mid-epoch), in one process and in 2-process DDP, with a negative control; exactly-once data across those
resumes and across a change of world size; crash-safe checkpoints; deterministic runs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from reliability_harness import (
    assert_states_equal,
    audit_ids,
    copy_run,
    losses,
    make_dataset,
    start,
    state,
    steps_per_epoch,
)

from gcvit.engine.checkpoint import CheckpointManager
from gcvit.engine.faults import SAVE_PAUSE_ENV, SAVE_PAUSE_MARKER, STEP_PAUSE_ENV, STEP_PAUSE_MARKER

pytestmark = pytest.mark.slow

N = 8  # optimizer steps of every run
SPE = 3  # steps per epoch: 56 train images at global batch 16 (8 dropped); epochs end at steps 3 and 6
K = 5  # killed inside step 5; the newest checkpoint then is step 4, one step into epoch 1
COMMON = ("debug=tiny", "sched.epochs=4", f"trainer.max_steps={N}", "trainer.deterministic=true",
          "trainer.audit=true", "trainer.ckpt_every_steps=2", "trainer.keep_checkpoints=10",
          "trainer.global_batch_size=16", "trainer.eval_every_epochs=1000")
ONE = ("data.batch_size=8",)  # 1 rank x 8 x 2 micro-batches
TWO = ("data.batch_size=4",)  # 2 ranks x 4 x 2 micro-batches
COMPARED = ("model", "ema", "optimizer", "scaler", "schedule", "guard", "progress", "loader")


def _assert_same_run(ref: Path, run: Path) -> None:
    """Per-step losses and every stateful piece of the final checkpoint bitwise equal."""
    assert losses(run) == losses(ref)
    a, b = state(ref, "last"), state(run, "last")
    for key in COMPARED:
        assert_states_equal(a[key], b[key], key)


def _assert_exactly_once(run: Path, ref: Path) -> None:
    """Each epoch's consumed ids over all ranks and restarts: no duplicate, none missing, same as straight."""
    got, want = audit_ids(run), audit_ids(ref)
    assert sorted(got) == sorted(want)
    for epoch, ids in got.items():
        assert len(ids) == len(set(ids)), f"epoch {epoch}: {len(ids) - len(set(ids))} samples consumed twice"
        assert sorted(ids) == sorted(want[epoch]), f"epoch {epoch}: samples missing or extra"
    full = [e for e in want if (e + 1) * SPE <= N]
    assert full and all(len(want[e]) == SPE * 16 for e in full)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ...]:
    """Overrides naming a dataset of JPEGs this module writes (4 classes, 56 train and 12 val images)."""
    return (*COMMON, f"data.root={make_dataset(tmp_path_factory.mktemp('data'))}")


@pytest.fixture(scope="module")
def single(root: tuple[str, ...], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Straight run, and the same command SIGKILLed twice and restarted (plus a negative-control copy).

    Independent launches overlap (the paused ones sleep) to keep the wall time down on two cores.
    """
    tmp = tmp_path_factory.mktemp("single")
    one = (*root, *ONE)
    ref = start(tmp / "ref", *one)
    run = tmp / "run"
    out: dict[str, Any] = {"ref": ref.run_dir, "run": run}
    # Kill 1: inside the write of `last` at step 3 (the 2nd save() of the process; step 2 was the 1st).
    r1 = start(run, *one, env={SAVE_PAUSE_ENV: "600@2"})
    r1.wait_for(SAVE_PAUSE_MARKER)
    out["tmp_files"] = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".last.pt.tmp")]
    r1.kill()
    out["losses_before_kill"] = losses(run)
    mgr = CheckpointManager(run / "checkpoints")
    out["latest_after_kill"] = mgr.latest()
    out["step_after_kill"] = state(run)["progress"]["step"]
    # A damaged `last` (a half-copied file, say): the next start must warn and fall back to its twin.
    data = mgr.path("last").read_bytes()
    mgr.path("last").unlink()
    mgr.path("last").write_bytes(data[: len(data) // 3])
    # Kill 2: in micro-batch 1 of step K (gradients of micro-batch 0 accumulated, no optimizer step yet).
    r2 = start(run, *one, env={STEP_PAUSE_ENV: f"{K}:1"})
    r2.wait_for(STEP_PAUSE_MARKER)
    r2.kill()
    out["r2"] = r2
    # Negative control: resume as a trainer that does not restore the loader would (the epoch starts over).
    neg = out["neg"] = copy_run(run, tmp / "neg")
    neg_mgr = CheckpointManager(neg / "checkpoints")
    doctored = neg_mgr.load(neg_mgr.path(f"step{K - 1:09d}"))
    out["neg_position"] = doctored["loader"]["position"]
    doctored["loader"]["position"] = 0
    neg_mgr.save(doctored, tag=("last", f"step{K - 1:09d}"))
    r3, rneg = start(run, *one), start(neg, *one)
    out["r3"] = r3.check()
    rneg.check()
    ref.check()
    return out


def test_sigkill_inside_save_of_last_keeps_the_previous_last(single: dict[str, Any]) -> None:
    assert len(single["tmp_files"]) == 1  # the kill interrupted a real write of `last`
    assert single["latest_after_kill"].name == "last.pt" and single["step_after_kill"] == 2


def test_corrupt_last_gives_one_line_and_the_previous_good_one_is_used(single: dict[str, Any]) -> None:
    r2 = single["r2"]
    warnings = [ln for ln in r2.err().splitlines() if "skipping checkpoint" in ln]
    assert len(warnings) == 1 and "last.pt" in warnings[0] and "truncated" in warnings[0]
    assert "step000000002.pt at step 2" in r2.out()


def test_identical_deterministic_runs_give_identical_losses(single: dict[str, Any]) -> None:
    before = single["losses_before_kill"]
    assert len(before) >= 3
    assert before == {s: v for s, v in losses(single["ref"]).items() if s in before}


def test_resume_after_sigkill_mid_epoch_in_accumulation_is_bitwise(single: dict[str, Any]) -> None:
    assert f"at step {K - 1}" in single["r3"].out()
    assert steps_per_epoch(single["ref"]) == SPE
    _assert_same_run(single["ref"], single["run"])


def test_exactly_once_data_across_sigkill_resumes(single: dict[str, Any]) -> None:
    _assert_exactly_once(single["run"], single["ref"])


def test_negative_control_stale_loader_state_is_detected(single: dict[str, Any]) -> None:
    """The comparisons above fail for a resume that starts the epoch over instead of restoring the loader."""
    assert single["neg_position"] > 0  # the resume point is mid-epoch
    with pytest.raises(AssertionError):
        _assert_same_run(single["ref"], single["neg"])
    with pytest.raises(AssertionError):
        _assert_exactly_once(single["neg"], single["ref"])


@pytest.fixture(scope="module")
def ddp(root: tuple[str, ...], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """2-rank straight run; the same SIGKILLed in accumulation and restarted; a copy resumed on 1 rank."""
    tmp = tmp_path_factory.mktemp("ddp")
    one, two = (*root, *ONE), (*root, *TWO)
    ref = start(tmp / "ref", *two, nproc=2)
    run = tmp / "run"
    r1 = start(run, *two, nproc=2, env={STEP_PAUSE_ENV: f"{K}:1"})
    r1.wait_for(STEP_PAUSE_MARKER)  # both ranks in step K, micro-batch 0's gradients accumulated locally
    r1.kill()
    resized = copy_run(run, tmp / "resized")
    # Same global batch 16 on one rank: 8 per micro-batch x 2 micro-batches.
    r2, r3 = start(run, *two, nproc=2), start(resized, *one)
    ref.check()
    return {"ref": ref.run_dir, "run": run, "resized": resized, "r2": r2.check(), "r3": r3.check()}


def test_ddp_resume_after_sigkill_in_accumulation_is_bitwise(ddp: dict[str, Any]) -> None:
    assert f"at step {K - 1}" in ddp["r2"].out()
    _assert_same_run(ddp["ref"], ddp["run"])


def test_ddp_exactly_once_across_sigkill_resume_and_world_size_change(ddp: dict[str, Any]) -> None:
    _assert_exactly_once(ddp["run"], ddp["ref"])
    assert f"at step {K - 1}" in ddp["r3"].out()
    assert json.loads((ddp["resized"] / "run_info.json").read_text())["world_size"] == 1
    _assert_exactly_once(ddp["resized"], ddp["ref"])
