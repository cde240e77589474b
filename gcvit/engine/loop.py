"""The training and evaluation loop of train.py, readable top to bottom.

run() -> evaluate_only() | train(). train(): run dir -> data -> model + recipe (build) -> auto-resume ->
epochs of optimizer steps (train_step) with logging, periodic checkpoints and the preemption check at
every step boundary -> evaluation of model and EMA and `last`/`best` checkpoints at every epoch end.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

import gcvit
from gcvit.config import Config, to_container
from gcvit.engine import distributed, faults, metrics, optim, param_groups, pretrained
from gcvit.engine.checkpoint import CheckpointManager
from gcvit.engine.compile import compiled
from gcvit.engine.distributed import PREEMPTED_EXIT_CODE, DistEnv
from gcvit.engine.eval_mode import evaluate_only
from gcvit.engine.eval_scores import evaluate
from gcvit.engine.guard import NonFiniteGuard
from gcvit.engine.rng import rng_state, seed_step, set_rng_state
from gcvit.engine.run_dir import prepare_run_dir
from gcvit.engine.runtime import autocast, configure_runtime
from gcvit.engine.secrets import install_log_redaction, redact
from gcvit.engine.wandb_logger import WandbLogger
from gcvit_data.loader_base import AUDIT_ENV, trim_audit
from gcvit_data.loaders import build_loader
from gcvit_data.resolve import resolve_data
from gcvit_data.split import describe as describe_split

# Steps of a compiled run whose time is compilation (forward and backward in the first, the
# accumulation/DDP variants and recompiles in the second), not what a step costs.
COMPILE_WARMUP_STEPS = 2


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next step
    best_top1: float = -1.0  # best selection metric so far (EMA top-1 when the EMA is on)


class StepOutOfMemory(RuntimeError):
    """The device ran out of memory in a training step; the message says what to change."""


def out_of_memory(cfg: Config, env: DistEnv, step: int, accum: int, error: torch.OutOfMemoryError) -> str:
    """One line for a CUDA OOM in training step `step`: the micro-batch that failed and what to do."""
    b = cfg.data.batch_size
    asked = re.search(r"Tried to allocate ([\d.]+ \w+)", str(error))
    size = f"tried to allocate {asked.group(1)} for " if asked else ""
    # Half of an even batch keeps the global batch reachable by accumulation (and Mixup's pairs when it is
    # a multiple of 4).
    example = f" (e.g. data.batch_size={b // 2})" if b % 4 == 0 else ""
    return (f"CUDA out of memory in training step {step} on {env.device} "
            f"({size}a micro-batch of data.batch_size={b} "
            f"images of {cfg.model.img_size} px, {cfg.model.name}, {cfg.trainer.precision}, {accum} "
            f"micro-batch(es) per step on each of {env.world_size} rank(s)): lower data.batch_size{example}, "
            f"gradient accumulation then keeps trainer.global_batch_size={cfg.trainer.global_batch_size} and "
            "so the recipe; or set model.grad_checkpointing=true (recomputes activations in backward)")


def run(cfg: Config) -> int:
    """Run the configured job; returns the exit code (0 done, PREEMPTED_EXIT_CODE stopped by a signal)."""
    env = distributed.init(cfg.trainer.device)
    install_log_redaction()
    configure_runtime(cfg)
    code = evaluate_only(cfg, env) if cfg.mode == "eval" else train(cfg, env)
    distributed.shutdown()  # not on exceptions: the barrier would wait for ranks that are gone
    return code


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
    start: dict[str, Any] | None = None  # what model.pretrained loaded (run_info.json), None otherwise
    faults: faults.StepFaults | None = None  # tests only: what GCVIT_TEST_* injects into the steps


def build(cfg: Config, env: DistEnv, data: Any, init_weights: bool = True) -> Parts:
    """Loaders, model, EMA and the recipe, all derived from the global batch and the world size;
    `init_weights`: apply model.pretrained (not when the run resumes from its own checkpoint)."""
    t, aug = cfg.trainer, cfg.aug
    common = dict(img_size=cfg.model.img_size, seed=t.seed, rank=env.rank, world_size=env.world_size,
                  device=env.device, audit=t.audit, precision=t.precision)
    train_loader = build_loader(data, aug, split="train", **common)
    val_loader = build_loader(data, aug, split="val", **common)
    accum = optim.accumulation_steps(t.global_batch_size, data.batch_size, env.world_size)
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch == 0:
        raise SystemExit(f"config error: trainer.global_batch_size={t.global_batch_size} exceeds the "
                         f"{train_loader.num_samples} training images; lower it")
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = gcvit.create_model(cfg.model.name, num_classes=train_loader.num_classes,
                               img_size=cfg.model.img_size, drop_path_rate=cfg.model.drop_path_rate,
                               **cfg.model.overrides)
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
        net=torch.compile(net) if compiled(cfg, env) else net,
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
        faults=faults.step_faults())


def unused_parameters(model: nn.Module, img_size: int, device: torch.device) -> list[str]:
    """Names of parameters no forward reaches (e.g. a reduced model's idle branches); DDP must know them."""
    was_training = model.training
    model.eval()  # no running-stat updates; gradients still flow
    model(torch.zeros(2, 3, img_size, img_size, device=device)).float().sum().backward()
    unused = [n for n, q in model.named_parameters() if q.requires_grad and q.grad is None]
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return unused


def train_step(p: Parts, batches: Any, env: DistEnv, cfg: Config, stop: torch.Tensor) -> dict[str, Any]:
    """One optimizer step over `accum` micro-batches: forward/backward, clip, guard, AdamW, EMA.

    Nothing here waits for the device: the guard's verdict (and the stop request `stop`, 0/1 on the
    device) travel in one all-reduce and the optimizer applies the verdict itself; the loop reads them later.
    """
    lr = p.schedule.apply(p.optimizer)
    loss_sum, wait = torch.zeros((), device=env.device), 0.0
    for micro in range(p.accum):
        tic = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - tic
        x, y = batch.images, batch.labels
        if p.mixup is not None:
            x, y = p.mixup(x, y)
        if p.erasing is not None:
            x = p.erasing(x)
        # Gradients are all-reduced on the last micro-batch only; the others accumulate locally.
        last = micro == p.accum - 1
        with p.net.no_sync() if env.distributed and not last else contextlib.nullcontext():
            with autocast(env.device, cfg.trainer.precision):
                loss = p.criterion(p.net(x), y)
                if p.faults is not None:  # a test's NaN, OOM or pause (gcvit.engine.faults)
                    loss = p.faults.on_loss(loss, p.schedule.step + 1, micro)
            p.scaler.scale(loss / p.accum).backward()
        loss_sum += loss.detach().float()
    p.scaler.unscale_(p.optimizer)
    grad_norm = nn.utils.clip_grad_norm_(p.model.parameters(), cfg.optim.clip_grad or float("inf"))
    found_inf = p.guard.check(loss_sum, grad_norm, stop)  # a collective: every rank gets the same verdict
    # Not scaler.step(): it would replace the verdict with its own overflow flag (which the guard's grad
    # norm already covers); update() reads the flag unscale_() recorded.
    optim.step_unless(p.optimizer, found_inf)
    p.scaler.update()
    p.optimizer.zero_grad(set_to_none=True)
    p.schedule.step += 1
    if p.ema is not None:
        p.ema.update(p.model, step=p.schedule.step)
    return {"loss": loss_sum / p.accum, "lr": lr, "grad_norm": grad_norm, "wait": wait}


def checkpoint_state(p: Parts, progress: Progress, wandb: WandbLogger, cfg: Config) -> dict[str, Any]:
    """Every stateful piece, with the RNG states of all ranks gathered; a collective: all ranks call it."""
    return {"model": p.model.state_dict(), "ema": p.ema.module.state_dict() if p.ema else None,
            "optimizer": p.optimizer.state_dict(), "scaler": p.scaler.state_dict(),
            "schedule": p.schedule.state_dict(), "guard": p.guard.state_dict(), "wandb": wandb.state_dict(),
            "progress": asdict(progress), "loader": p.train_loader.state_dict(),
            "rng": distributed.gather_object(rng_state()), "config": redact(to_container(cfg)),
            "classes": p.train_loader.classes}


def restore(p: Parts, state: dict[str, Any], wandb: WandbLogger, env: DistEnv) -> Progress:
    """Load a checkpoint_state() into the parts; returns the saved progress."""
    p.model.load_state_dict(state["model"])
    if p.ema is not None and state["ema"] is not None:
        p.ema.module.load_state_dict(state["ema"])
    p.optimizer.load_state_dict(state["optimizer"])
    p.scaler.load_state_dict(state["scaler"])
    p.schedule.load_state_dict(state["schedule"])
    p.guard.load_state_dict(state["guard"])
    wandb.load_state_dict(state["wandb"])
    if len(state["rng"]) == env.world_size:  # with another world size the per-step seeds take over
        set_rng_state(state["rng"][env.rank])
    return Progress(**state["progress"])


def train(cfg: Config, env: DistEnv) -> int:
    """Train with the recipe in `cfg`, resuming from the run dir's newest checkpoint when there is one."""
    t = cfg.trainer
    run_dir = prepare_run_dir(cfg, env)
    data = resolve_data(cfg, env)
    if t.audit:  # every rank's train/val loader appends the sample ids it hands out to RUN_DIR/audit
        os.environ.setdefault(AUDIT_ENV, str(run_dir / "audit"))
    ckpt = CheckpointManager(run_dir / "checkpoints", keep=t.keep_checkpoints)
    # auto-resume from the run dir's newest loadable checkpoint takes precedence over model.pretrained
    latest = distributed.broadcast_object(str(ckpt.latest() or "") if env.is_main else None)
    p = build(cfg, env, data, init_weights=not latest)
    if p.val_loader.split_record and env.is_main:
        print(describe_split(p.val_loader.split_record), flush=True)
    target = min(p.total_steps, t.max_steps or p.total_steps)
    writer = metrics.MetricsWriter(run_dir, env.is_main)
    wandb = WandbLogger(cfg.logger.wandb.mode, cfg.logger.wandb.project, cfg.logger.wandb.entity,
                        run_dir, env.is_main)
    progress, loader_state = Progress(), None
    if latest:
        state = ckpt.load(Path(latest))
        progress, loader_state = restore(p, state, wandb, env), state["loader"]
        writer.truncate_after(progress.step)
        if t.audit:
            if env.is_main:
                trim_audit(os.environ[AUDIT_ENV], loader_state["epoch"], loader_state["position"])
            distributed.broadcast_object(None)  # no rank appends before the trim is done
        if env.is_main:
            print(f"resumed from {latest} at step {progress.step} (epoch {progress.epoch})", flush=True)
    if progress.step >= target:
        if env.is_main:
            print(f"run already finished (step {progress.step} of {target}) in {run_dir}; nothing to do (to "
                  "train on: raise trainer.max_steps, or sched.cooldown_epochs/sched.epochs with "
                  "trainer.resume=force)")
        return 0

    base_lr = p.schedule.base_lr
    if env.is_main:
        n_params = sum(q.numel() for q in p.model.parameters())
        info = metrics.run_info(env.world_size, env.device, {
            "run_dir": str(run_dir), "num_params": n_params, "accumulation": p.accum, "lr": base_lr,
            "steps_per_epoch": p.steps_per_epoch, "total_steps": p.total_steps, "target_steps": target,
            "pretrained": p.start, "classes": p.train_loader.classes, "val_split": p.val_loader.split_record})
        (run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
        print(f"run dir: {run_dir}\n{n_params / 1e6:.2f}M params on {env.world_size} x {env.device}; global "
              f"batch {t.global_batch_size} = {data.batch_size} x {env.world_size} ranks x {p.accum} "
              f"accumulation; lr {base_lr:.3g}; {p.steps_per_epoch} steps/epoch; {target} steps", flush=True)
    wandb.start(run_dir.name, redact(to_container(cfg)))
    cuda = env.device.type == "cuda"
    flops = metrics.train_flops_per_image(p.model, cfg.model.img_size, env.device) if cuda else None
    peak = metrics.peak_flops(env.device, t.precision)

    def save(*tags: str) -> None:
        p.guard.settle()  # the counters saved include every step so far (a stop policy may still raise)
        state = checkpoint_state(p, progress, wandb, cfg)
        if env.is_main:
            ckpt.save(state, tag=tags)  # written once, the other tags are hard links

    # The first steps after a (re)start compile the graphs (minutes): img/s leaves them out.
    warmup_until = progress.step + (COMPILE_WARMUP_STEPS if compiled(cfg, env) else 0)
    stop = distributed.StopFlag().install()
    bar = metrics.Progress(total=target, initial=progress.step, enabled=env.is_main and cfg.logger.progress)
    exit_code = 0
    p.model.train()
    try:
        while progress.step < target:
            epoch = progress.epoch = progress.step // p.steps_per_epoch
            p.train_loader.set_epoch(epoch)
            if loader_state is not None and progress.step % p.steps_per_epoch:
                p.train_loader.load_state_dict(loader_state)  # continue mid-epoch at the next sample
            loader_state = None
            batches = iter(p.train_loader)
            epoch_end = min((epoch + 1) * p.steps_per_epoch, target)
            window = metrics.Window(env.device)
            while progress.step < epoch_end:
                seed_step(t.seed, env.rank, progress.step)
                try:
                    out = train_step(p, batches, env, cfg, stop.tensor(env.device))
                except torch.OutOfMemoryError as e:
                    raise StepOutOfMemory(out_of_memory(cfg, env, progress.step + 1, p.accum, e)) from None
                progress.step += 1
                window.add(out["loss"], out["wait"])
                if progress.step <= warmup_until:
                    window.restart_clock()
                log_now = progress.step % t.log_every_steps == 0 or progress.step == epoch_end
                # the epoch end saves anyway
                periodic = bool(t.ckpt_every_steps) and progress.step % t.ckpt_every_steps == 0 \
                    and progress.step < epoch_end
                # Steady state reads the previous step's verdicts while the device runs this one; log and
                # checkpoint steps wait for this one too.
                stopping = p.guard.settle(keep_last=not (log_now or periodic))
                if log_now:
                    rec = window.record(step=progress.step, epoch=epoch, lr=out["lr"],
                                        grad_norm=float(out["grad_norm"]), global_batch=t.global_batch_size,
                                        world_size=env.world_size, flops_per_image=flops, peak=peak)
                    writer.write(rec)
                    wandb.log(rec, step=progress.step)
                    bar.show(rec)

                # step boundary: a stop signal on any rank makes all ranks save once and exit together
                if stopping:
                    save("last")
                    if env.is_main:
                        why = f"signal {stop.signum}" if stop.signum else "a stop signal on another rank"
                        bar.write(f"{why}: saved step {progress.step} in {ckpt.run_dir}; "
                                  f"exiting with {PREEMPTED_EXIT_CODE} so the launcher requeues")
                    exit_code = PREEMPTED_EXIT_CODE
                    return exit_code
                if periodic:
                    save("last", f"step{progress.step:09d}")

            # ---- epoch end: evaluate model and EMA; `last` always, `best` by (EMA) top-1
            progress.epoch = progress.step // p.steps_per_epoch
            tags = ["last", f"step{progress.step:09d}"]
            if progress.step >= target or (epoch + 1) % t.eval_every_epochs == 0:
                rec = {"kind": "eval", "step": progress.step, "epoch": epoch}
                res = evaluate(p.model, p.val_loader, env, t.precision)
                rec.update(top1=res["top1"], top5=res["top5"], count=res["count"])
                if p.ema is not None:
                    res = evaluate(p.ema.module, p.val_loader, env, t.precision)
                    rec.update(ema_top1=res["top1"], ema_top5=res["top5"])
                writer.write(rec)
                wandb.log(rec, step=progress.step)
                if rec.get("ema_top1", rec["top1"]) > progress.best_top1:
                    progress.best_top1 = rec.get("ema_top1", rec["top1"])
                    tags.append("best")
                if env.is_main:
                    ema_txt = f" | EMA top1 {rec['ema_top1']:.2f} top5 {rec['ema_top5']:.2f}" if p.ema else ""
                    bar.write(f"epoch {epoch}: top1 {rec['top1']:.2f} top5 {rec['top5']:.2f}{ema_txt} "
                              f"({rec['count']} val images)")
            save(*tags)
    finally:
        bar.close()
        stop.uninstall()
        wandb.finish(exit_code=exit_code)
    if env.is_main:
        print(f"done: {progress.step} steps, best top1 {progress.best_top1:.2f}; run dir {run_dir}",
              flush=True)
    return 0
