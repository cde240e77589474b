"""Everything a training run is made of (Parts), built from the config and the world size: loaders,
model, EMA and the recipe (optimizer, schedule, scaler, guard, Mixup/CutMix, erasing, loss)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

from gcvit.config import Config, TrainerConfig
from gcvit.engine import distributed, optim, param_groups, pretrained
from gcvit.engine.compile import compile_model, how, kernels
from gcvit.engine.distributed import DistEnv
from gcvit.engine.guard import NonFiniteGuard
from gcvit.engine.step_accounting import StepClock
from gcvit.models import create_model
from gcvit_data.loaders import build_loader


@dataclass
class Parts:
    """Everything a training run is made of."""

    train_loader: Any
    val_loader: Any
    model: nn.Module  # the bare model (what is saved and evaluated)
    net: nn.Module  # what the step calls: DDP wrapper and/or compiled
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    schedule: optim.WarmupCosine
    scaler: torch.amp.GradScaler
    guard: NonFiniteGuard
    mixup: Mixup | None
    erasing: RandomErasing | None
    criterion: nn.Module
    accum: int  # micro-batches per optimizer step on each rank
    steps_per_epoch: int
    total_steps: int  # schedule length incl. cooldown
    clock: StepClock  # where each step's time goes, gathered at log steps (gcvit.engine.step_accounting)
    start: dict[str, Any] | None = None  # what model.pretrained loaded (run_info.json), None otherwise


def build(cfg: Config, env: DistEnv, data: Any, init_weights: bool = True,
          audit_dir: str | None = None) -> Parts:
    """Loaders, model, EMA and the recipe, all derived from the global batch and the world size;
    `init_weights`: apply model.pretrained (not when the run resumes from its own checkpoint); `audit_dir`:
    where the loaders record the sample ids they hand out (trainer.audit), None for no record."""
    t, aug = cfg.trainer, cfg.aug
    common = dict(img_size=cfg.model.img_size, seed=t.seed, rank=env.rank, world_size=env.world_size,
                  device=env.device, audit_dir=audit_dir, precision=t.precision)
    train_loader = build_loader(data, aug, split="train", **common)
    val_loader = build_loader(data, aug, split="val", **common)
    accum = optim.accumulation_steps(t.global_batch_size, data.batch_size, env.world_size)
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch == 0:
        raise SystemExit(f"config error: trainer.global_batch_size={t.global_batch_size} exceeds the "
                         f"{train_loader.num_samples} training images; lower it")
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = create_model(cfg.model.name, num_classes=train_loader.num_classes, img_size=cfg.model.img_size,
                         drop_path_rate=cfg.model.drop_path_rate, **cfg.model.overrides)
    model.set_kernels(*kernels(cfg, env, training=True))
    start = None
    if init_weights:  # before .to(device): the file is read onto the CPU
        start = pretrained.start_from(model, cfg.model, train_loader.classes, env.is_main, env.local_rank)
    frozen = param_groups.freeze(model, cfg.model.freeze)  # before DDP and the optimizer: both skip them
    if frozen and env.is_main:
        print(frozen, flush=True)
    model = model.to(env.device)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    net: nn.Module = model
    if env.distributed:
        unused = unused_parameters(model, cfg.model.img_size, env.device)
        if unused and env.is_main:
            print(f"{len(unused)} parameter tensors get no gradient (e.g. {unused[0]}); DDP looks for unused "
                  "parameters every step", flush=True)
        net = distributed.wrap_ddp(model, env.device, unused, accum)
    base_lr = optim.scaled_lr(cfg.optim.lr, cfg.optim.lr_batch_size, t.global_batch_size)
    schedule, total_steps = optim.build_schedule(
        base_lr=base_lr, steps_per_epoch=steps_per_epoch, epochs=cfg.sched.epochs,
        warmup_epochs=cfg.sched.warmup_epochs, cooldown_epochs=cfg.sched.cooldown_epochs,
        warmup_lr=cfg.sched.warmup_lr, min_lr=cfg.sched.min_lr)
    if cfg.optim.layer_decay is not None and env.is_main:
        print(param_groups.describe_layer_decay(model, cfg.optim.layer_decay), flush=True)
    mixing = aug.mixup > 0 or aug.cutmix > 0
    smoothing = aug.label_smoothing
    return Parts(
        train_loader=train_loader, val_loader=val_loader, model=model,
        net=compile_model(net, model, how(cfg, env), t.compile_mode),
        ema=ModelEmaV3(model, decay=t.ema_decay, use_warmup=t.ema_warmup) if t.ema_decay else None,
        optimizer=optim.build_optimizer(model, lr=base_lr, weight_decay=cfg.optim.weight_decay,
                                        betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, impl=cfg.optim.impl,
                                        layer_decay=cfg.optim.layer_decay),
        schedule=schedule, scaler=torch.amp.GradScaler(env.device.type, enabled=t.precision == "fp16"),
        guard=NonFiniteGuard(t.nonfinite_policy, t.nonfinite_max_consecutive,
                             scaler_handles_overflow=t.precision == "fp16", verbose=env.is_main),
        mixup=Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                    switch_prob=aug.switch_prob, label_smoothing=aug.label_smoothing,
                    num_classes=train_loader.num_classes) if mixing else None,
        erasing=RandomErasing(aug.reprob, mode=aug.remode, device=str(env.device)) if aug.reprob else None,
        # Mixup folds label smoothing into its soft targets; without it the plain loss smooths.
        criterion=SoftTargetCrossEntropy() if mixing else nn.CrossEntropyLoss(label_smoothing=smoothing),
        accum=accum, steps_per_epoch=steps_per_epoch, total_steps=total_steps, start=start,
        clock=StepClock(env.device, ratio=t.straggler_ratio, windows=t.straggler_windows).watch(
            model.parameters()))


def unused_parameters(model: nn.Module, img_size: int, device: torch.device) -> list[str]:
    """Names of parameters no forward reaches (e.g. a reduced model's idle branches); DDP must know them."""
    was_training = model.training
    model.eval()  # no running-stat updates; gradients still flow
    model(torch.zeros(2, 3, img_size, img_size, device=device)).float().sum().backward()
    unused = [n for n, q in model.named_parameters() if q.requires_grad and q.grad is None]
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return unused


def ema_lag(t: TrainerConfig, steps: int) -> str | None:
    """One line when the EMA cannot follow the model within a run of `steps`: its horizon (about
    1/(1 - decay) steps) is more than half the run and no warmup shortens it; None otherwise."""
    if not t.ema_decay or t.ema_warmup:
        return None
    horizon = 1 / (1 - t.ema_decay)
    if horizon <= steps / 2:
        return None
    decay = max(0.5, 1 - 10 / steps)  # a horizon of about a tenth of the run
    return (f"EMA: trainer.ema_decay={t.ema_decay} averages over ~{horizon:.0f} steps, more than half of "
            f"this run's {steps}, so its weights lag the model's (best.pt keeps whichever scores better); "
            f"set trainer.ema_warmup=true or trainer.ema_decay={decay:.3g}")
