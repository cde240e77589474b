"""Non-finite guard: all ranks decide together, on the device, whether each optimizer step is safe.

One all-reduce per step carries (any-rank-bad flag, loss, grad norm, stop request). The verdict stays on the
device: a bad step is skipped by the optimizer itself (`found_inf`), so the CPU never waits for the GPU to
learn it and can queue the next step. The host reads the packet later through a pinned copy (settle():
one step late in steady state, at once at log and checkpoint steps) to count, report and apply the policy:
`skip` skips and counts forever; `stop` also skips but raises NonFiniteError after `max_consecutive` bad
steps in a row. Weights, optimizer moments and therefore every checkpoint stay finite.
"""
from __future__ import annotations

import math
import sys
from collections import deque
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

POLICIES = ("skip", "stop")


class NonFiniteError(RuntimeError):
    """Raised (on every rank at once) when the stop policy gives up."""


class _Pending(NamedTuple):
    """One step's reduced packet on its way to the host."""

    step: int
    host: torch.Tensor  # (flag, loss sum, grad norm sum, stop sum) over ranks, float64
    ready: torch.cuda.Event | None  # recorded after the copy to `host` (CUDA only)


class NonFiniteGuard:
    """Decides per optimizer step, on the device, whether loss and grad norm are finite on every rank."""

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
        self.steps = 0  # steps checked on the host so far
        self.skipped = 0  # bad steps skipped in total
        self.consecutive = 0  # bad steps in a row ending at the last one checked
        self._issued = 0  # steps whose verdict was queued (check()); ahead of `steps` until settle()
        self._pending: deque[_Pending] = deque()

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor,
              stop: torch.Tensor | None = None) -> torch.Tensor:
        """Queue this step's verdict (a collective: call on all ranks); returns `found_inf` for the optimizer.

        `found_inf` is a float32 0/1 on the device, equal on every rank, that a fused optimizer honours
        without a host read. `stop` (0/1 on the device) is this rank's stop request; it rides along.
        """
        self._issued += 1
        loss_t = loss.detach().to(torch.float64).reshape(())
        norm_t = grad_norm.detach().to(device=loss_t.device, dtype=torch.float64).reshape(())
        stop_t = torch.zeros((), dtype=torch.float64, device=loss_t.device) if stop is None else \
            stop.to(device=loss_t.device, dtype=torch.float64).reshape(())
        bad_local = (~torch.isfinite(loss_t)) | (~torch.isfinite(norm_t))
        # Sums propagate NaN/Inf from any rank; the flag catches the rare case where +inf and -inf cancel.
        packed = torch.stack([bad_local.to(torch.float64), loss_t, norm_t, stop_t])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        found_inf = ((packed[0] > 0) | ~torch.isfinite(packed[1:3]).all()).to(torch.float32)
        if packed.device.type == "cuda":
            host = torch.empty(4, dtype=torch.float64, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host, ready = packed, None
        self._pending.append(_Pending(self._issued, host, ready))
        return found_inf

    def settle(self, keep_last: bool = False) -> bool:
        """Read the queued verdicts (all, or all but the newest): count, report, apply the policy.

        Returns True when any rank asked to stop in a step read now; every rank reads the same reduced
        packets, so all get the same answer at the same step. Raises NonFiniteError per the stop policy.
        """
        stop = False
        while len(self._pending) > int(keep_last):
            step, host, ready = self._pending.popleft()
            if ready is not None:
                ready.synchronize()  # waits for that step only; the step queued after it keeps the GPU busy
            flag, loss_sum, norm_sum, stop_sum = host.tolist()
            stop = stop or stop_sum > 0
            self._account(step, flag, loss_sum, norm_sum)
        return stop

    def _account(self, step: int, flag: float, loss_sum: float, norm_sum: float) -> None:
        self.steps = step
        if flag == 0 and math.isfinite(loss_sum) and math.isfinite(norm_sum):
            self.consecutive = 0
            return
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        mean_loss, norm = loss_sum / world, norm_sum / world
        self.skipped += 1
        if self.scaler_handles_overflow and math.isfinite(mean_loss):
            return  # the GradScaler lowers its scale; not a sign of divergence
        self.consecutive += 1
        where = f"step {step}: loss={mean_loss} grad_norm={norm}"
        if self.policy == "stop" and self.consecutive >= self.max_consecutive:
            self._pending.clear()  # later steps are not reported: the run ends here
            raise NonFiniteError(
                f"non-finite values at {where}; {self.consecutive} bad step(s) in a row reached "
                f"max_consecutive={self.max_consecutive}, stopping (weights and checkpoints hold the last "
                "finite step); lower the lr, enable clipping, or resume from an earlier checkpoint")
        if self.verbose and (not dist.is_initialized() or dist.get_rank() == 0):
            print(f"non-finite guard: skipped {where} ({self.consecutive} in a row, {self.skipped} in total)",
                  file=sys.stderr, flush=True)

    def state_dict(self) -> dict[str, Any]:
        """Counters, so a resumed run keeps counting (plain ints: loadable with weights_only=True).

        Call settle() first: a verdict still in flight is not counted yet.
        """
        return {"steps": self.steps, "skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of state_dict()."""
        self.steps = self._issued = int(state["steps"])
        self.skipped = int(state["skipped"])
        self.consecutive = int(state["consecutive"])
        self._pending.clear()
