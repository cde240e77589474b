"""The optimizer of a run and what drives it: torch/apex AdamW, the per-step lr schedule, lr scaling and
gradient accumulation (which parameters it updates: param_groups.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gcvit.engine.param_groups import layer_decay_groups, weight_decay_groups


def scaled_lr(lr: float, lr_batch_size: int, global_batch_size: int) -> float:
    """The linear scaling rule: `lr` is quoted at `lr_batch_size` samples per optimizer step."""
    return lr * global_batch_size / lr_batch_size


def accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches each rank accumulates per optimizer step so that the step sees `global_batch_size`."""
    per_step = micro_batch_size * world_size
    if global_batch_size < per_step:
        # The recipe's 1024 at 128 per GPU fills 8 GPUs; more GPUs need a larger global batch (and with it
        # the larger lr that optim.lr's linear scaling gives) or smaller micro-batches.
        keep = (f", or data.batch_size={global_batch_size // world_size} to keep the global batch"
                if global_batch_size % world_size == 0 else "")
        raise SystemExit(
            f"trainer.global_batch_size={global_batch_size} is smaller than data.batch_size x world size = "
            f"{micro_batch_size} x {world_size} = {per_step}: set trainer.global_batch_size={per_step} "
            "(the lr scales linearly with it from optim.lr at optim.lr_batch_size; the official GC ViT runs "
            f"used 128 x 32 GPUs = 4096){keep}; table: docs/gpu-training.md")
    if global_batch_size % per_step:
        raise SystemExit(
            f"trainer.global_batch_size={global_batch_size} is not a multiple of data.batch_size x world size"
            f" = {micro_batch_size} x {world_size} = {per_step}; pick a global batch that is, or change"
            " data.batch_size")
    return global_batch_size // per_step


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, impl: str, layer_decay: float | None = None) -> torch.optim.Optimizer:
    """AdamW over weight_decay_groups (or layer_decay_groups with `layer_decay`): torch's fused kernels (CPU
    and CUDA) or apex's FusedAdam."""
    if layer_decay is not None:
        groups = layer_decay_groups(model, weight_decay, layer_decay)
    else:
        groups = weight_decay_groups(model, weight_decay)
    if impl == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            raise SystemExit("optim.impl=apex but NVIDIA apex is not installed (build it from github.com/"
                             "NVIDIA/apex with its CUDA extensions), or use optim.impl=torch") from None
        return FusedAdam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    if impl != "torch":
        raise SystemExit(f"optim.impl={impl!r} is not one of: torch, apex")
    # Fused on CPU too: measured once 3.5x faster than the foreach kernels on gcvit_tiny's parameters
    # (2 cores, torch 2.14), and it skips a bad step on its own (step_unless).
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def step_unless(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """optimizer.step() unless `found_inf` (float32 0/1 on the device) is 1.

    torch's fused optimizers take the flag as GradScaler hands it to them and decide on the device: a
    flagged step leaves weights, moments and step counts as they were, and the host never waits for the
    verdict. Others (apex) need it on the host, which on a GPU costs a sync per step.
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = found_inf  # type: ignore[attr-defined]
        optimizer.step()
    elif not found_inf.item():
        optimizer.step()


@dataclass
class WarmupCosine:
    """Per-step lr: linear warmup, half-cosine to `min_lr`, then `min_lr` through the cooldown.

    Same values as timm's CosineLRScheduler(t_initial=total, lr_min=min_lr, warmup_t=warmup,
    warmup_lr_init=warmup_lr, warmup_prefix=False, cycle_limit=1, t_in_epochs=False): the cosine runs
    over [0, total) with the warmup overriding its start, and step `t` is the lr of the t-th update.
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    step: int = 0

    def lr_at(self, t: int) -> float:
        """The lr of optimizer step `t` (0-based)."""
        if t < self.warmup_steps:
            return self.warmup_lr + t * (self.base_lr - self.warmup_lr) / self.warmup_steps
        if t >= self.total_steps:
            return self.min_lr
        cos = 1 + math.cos(math.pi * t / self.total_steps)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * cos

    def apply(self, optimizer: torch.optim.Optimizer) -> float:
        """Write the lr of the current step into every param group (times its layer-decay lr_scale)."""
        lr = self.lr_at(self.step)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict[str, int]:
        """Only the position: the shape comes from the config, so a resumed run may change it."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at the saved position."""
        self.step = int(state["step"])


def build_schedule(*, base_lr: float, steps_per_epoch: int, epochs: int, warmup_epochs: float,
                   cooldown_epochs: int, warmup_lr: float, min_lr: float) -> tuple[WarmupCosine, int]:
    """Schedule of `epochs` of cosine plus `cooldown_epochs` at min lr; returns it and the total steps."""
    sched = WarmupCosine(base_lr=base_lr, total_steps=max(1, epochs * steps_per_epoch),
                         warmup_steps=int(round(warmup_epochs * steps_per_epoch)),
                         warmup_lr=warmup_lr, min_lr=min_lr)
    return sched, (epochs + cooldown_epochs) * steps_per_epoch
