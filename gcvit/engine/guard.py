"""Non-finite guard: all ranks decide together, before the optimizer step, whether the step is safe.

One all-reduce per step carries (any-rank-bad flag, loss, grad norm). A bad step is skipped, so the
weights, the optimizer moments and therefore every checkpoint stay finite. Policy `skip` skips and counts
forever; policy `stop` also skips but raises NonFiniteError after `max_consecutive` bad steps in a row.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

POLICIES = ("skip", "stop")
# Test-only knobs read by `inject`: comma-separated 1-based optimizer steps whose loss becomes NaN, and
# "STEP:MICRO" (0-based micro-batch) at which every rank stops for 10 minutes, printing PAUSE_MARKER, so a
# test can SIGKILL the run in the middle of gradient accumulation.
INJECT_ENV = "GCVIT_TEST_NAN_AT_STEPS"
PAUSE_ENV = "GCVIT_TEST_PAUSE_AT_MICRO"
PAUSE_MARKER = "GCVIT_TEST_PAUSED_IN_STEP"


class NonFiniteError(RuntimeError):
    """Raised (on every rank at once) when the stop policy gives up."""


class NonFiniteGuard:
    """Decides per optimizer step whether loss and grad norm are finite on every rank."""

    def __init__(self, policy: str = "stop", max_consecutive: int = 5, *,
                 scaler_handles_overflow: bool = False, verbose: bool = True) -> None:
        if policy not in POLICIES:
            raise ValueError(f"non-finite policy {policy!r} is invalid; allowed: {' | '.join(POLICIES)}")
        if max_consecutive < 1:
            raise ValueError(f"non-finite max_consecutive={max_consecutive} must be >= 1")
        self.policy = policy
        self.max_consecutive = max_consecutive
        # fp16 with a GradScaler: an inf grad norm with a finite loss is the scaler's routine overflow, which
        # it handles by lowering the scale; such a step is skipped but does not count towards stopping.
        self.scaler_handles_overflow = scaler_handles_overflow
        self.verbose = verbose
        self.steps = 0  # steps checked so far; the step being checked is steps + 1
        self.skipped = 0  # bad steps skipped in total
        self.consecutive = 0  # bad steps in a row ending at the last one checked
        self._inject = {int(s) for s in os.environ.get(INJECT_ENV, "").split(",") if s.strip()}
        pause = os.environ.get(PAUSE_ENV)
        self._pause_at = tuple(int(v) for v in pause.split(":")) if pause else None
        self._micro = 0  # inject() calls since the last step_ok(): the micro-batch index within the step

    def inject(self, loss: torch.Tensor) -> torch.Tensor:
        """Test hooks on each micro-batch's loss (before backward); the identity unless a test knob is set."""
        step, micro = self.steps + 1, self._micro
        self._micro += 1
        if self._pause_at == (step, micro):
            rank = os.environ.get("RANK", "0")
            print(f"{PAUSE_MARKER} {step}:{micro} rank {rank}", file=sys.stderr, flush=True)
            time.sleep(600)
        if step in self._inject:
            return loss * float("nan")
        return loss

    def step_ok(self, loss: torch.Tensor | float, grad_norm: torch.Tensor | float) -> bool:
        """True when every rank's loss and the grad norm are finite (a collective: call on all ranks)."""
        step = self.steps + 1
        self._micro = 0
        loss_t = torch.as_tensor(loss).detach().to(torch.float64).reshape(())
        norm_t = torch.as_tensor(grad_norm).detach().to(device=loss_t.device, dtype=torch.float64).reshape(())
        bad_local = (~torch.isfinite(loss_t)) | (~torch.isfinite(norm_t))
        # Sums propagate NaN/Inf from any rank; the flag catches the rare case where +inf and -inf cancel.
        packed = torch.stack([bad_local.to(torch.float64), loss_t, norm_t])
        world = 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        flag, loss_sum, norm_sum = packed.tolist()
        self.steps = step
        if flag == 0 and math.isfinite(loss_sum) and math.isfinite(norm_sum):
            self.consecutive = 0
            return True
        mean_loss, norm = loss_sum / world, norm_sum / world
        self.skipped += 1
        if self.scaler_handles_overflow and math.isfinite(mean_loss):
            return False  # the GradScaler lowers its scale; not a sign of divergence
        self.consecutive += 1
        where = f"step {step}: loss={mean_loss} grad_norm={norm}"
        if self.policy == "stop" and self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"non-finite values at {where}; {self.consecutive} bad step(s) in a row reached "
                f"max_consecutive={self.max_consecutive}, stopping (weights and checkpoints hold the last "
                "finite step); lower the lr, enable clipping, or resume from an earlier checkpoint")
        if self.verbose and (not dist.is_initialized() or dist.get_rank() == 0):
            print(f"non-finite guard: skipped {where} ({self.consecutive} in a row, {self.skipped} in total)",
                  file=sys.stderr, flush=True)
        return False

    def state_dict(self) -> dict[str, Any]:
        """Counters, so a resumed run keeps counting (plain ints: loadable with weights_only=True)."""
        return {"steps": self.steps, "skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of state_dict()."""
        self.steps = int(state["steps"])
        self.skipped = int(state["skipped"])
        self.consecutive = int(state["consecutive"])
