"""GPU tier, step: steady-state training steps never make the CPU wait for the GPU, with every kernel choice
(model.attention x model.norm, eager, and compiled by blocks) and in bf16 and fp16. The trainer's own step
(train_step, then the loop's one-step-late read of the verdict) runs under
torch.cuda.set_sync_debug_mode("error"), which raises on every synchronizing call (.item(), blocking copies,
stream syncs). Log and checkpoint steps, which read this step's values on purpose, are not part of it."""
from __future__ import annotations

import pytest
import torch
from test_trainer_step_sync import step_parts

from gcvit.engine.faults import NAN_ENV as INJECT_ENV
from gcvit.engine.faults import step_faults
from gcvit.engine.loop import train_step
from gcvit.engine.preemption import StopFlag
from gcvit.engine.rng import seed_step

# the first steps allocate the optimizer's moments, pick cuDNN kernels and compile (the gradient accumulation
# step and the last micro-batch's are different graphs)
WARMUP, STEADY = 3, 6
# (precision, model.attention, model.norm, trainer.compile): every kernel pair eager in bf16, the default in
# fp16 (GradScaler), and compiled by blocks with the default kernels and with flex + fast
CASES = [("bf16", att, norm, "off") for att in ("sdpa", "flex", "math") for norm in ("fp32", "fast")]
CASES += [("fp16", "sdpa", "fp32", "off"), ("bf16", "sdpa", "fp32", "blocks"),
          ("bf16", "flex", "fast", "blocks")]


@pytest.mark.parametrize("precision,attention,norm,compile", CASES, ids=["-".join(c) for c in CASES])
def test_steady_steps_never_sync_even_when_a_step_is_skipped(
        cuda, precision: str, attention: str, norm: str, compile: str, capfd: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INJECT_ENV, str(WARMUP + 2))  # a NaN loss inside the watched steps
    cfg, env, p = step_parts("cuda", f"trainer.precision={precision}", "trainer.nonfinite_policy=skip",
                             f"model.attention={attention}", f"model.norm={norm}",
                             f"trainer.compile={compile}")
    batches, stop, injected = iter(p.train_loader), StopFlag(), step_faults()

    def step(i: int) -> None:
        seed_step(cfg.trainer.seed, env.rank, i)
        train_step(p, batches, env, cfg, stop.tensor(env.device), injected)
        p.guard.settle(keep_last=True)

    for i in range(WARMUP):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(WARMUP, WARMUP + STEADY):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    p.guard.settle()
    assert p.guard.steps == WARMUP + STEADY
    assert f"skipped step {WARMUP + 2}: loss=nan" in capfd.readouterr().err
    # fp16's GradScaler may also skip (silently) steps its initial scale overflows
    assert p.guard.skipped == 1 if precision == "bf16" else p.guard.skipped >= 1
    assert all(torch.isfinite(t).all() for t in p.model.state_dict().values())
