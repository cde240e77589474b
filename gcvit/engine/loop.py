"""The training and evaluation loop of train.py, readable top to bottom.

run() -> evaluate_only() | train(). train(): prepare() (run dir -> data -> model + recipe (build) ->
auto-resume -> run_info.json) -> per epoch: run_epoch() (optimizer steps (train_step) with logging,
periodic checkpoints and the preemption check at every step boundary) -> end_of_epoch() (evaluation of
model and EMA, `last` and `best` checkpoints).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gcvit.config import Config, to_container
from gcvit.engine import distributed, faults, metrics, mfu, optim
from gcvit.engine.build import Parts, build, ema_lag
from gcvit.engine.checkpoint import CheckpointManager
from gcvit.engine.compile import CompileClock, compiled, compiles, how, use_cache
from gcvit.engine.distributed import PREEMPTED_EXIT_CODE, DistEnv
from gcvit.engine.eval_mode import evaluate_only
from gcvit.engine.eval_scores import evaluate
from gcvit.engine.faults import StepFaults
from gcvit.engine.preemption import StopFlag
from gcvit.engine.rng import rng_state, seed_step, set_rng_state
from gcvit.engine.run_dir import prepare_run_dir
from gcvit.engine.runtime import autocast, configure_runtime
from gcvit.engine.secrets import install_log_redaction, redact
from gcvit.engine.wandb_logger import WandbLogger
from gcvit.engine.watchdog import Watchdog, watch
from gcvit_data.loader_base import trim_audit
from gcvit_data.resolve import resolve_data
from gcvit_data.split import describe as describe_split

# Steps of a compiled run whose time is compilation (forward and backward in the first, the
# accumulation/DDP variants and recompiles in the second), not what a step costs.
COMPILE_WARMUP_STEPS = 2
# With trainer.audit, every rank's loaders append the sample ids they hand out to RUN_DIR/audit, or to the
# folder this variable names (docs/data.md).
AUDIT_ENV = "GCVIT_AUDIT_DIR"


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next step
    best_top1: float = -1.0  # best val top-1 so far, of the model or of its EMA, whichever scored better
    best_weights: str = ""  # which weights earned best_top1 (and `best`): model | ema; "" before any eval


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


def train_step(p: Parts, batches: Any, env: DistEnv, cfg: Config, stop: torch.Tensor,
               injected: StepFaults | None = None) -> dict[str, Any]:
    """One optimizer step over `accum` micro-batches: forward/backward, clip, guard, AdamW, EMA; `injected`:
    a test's faults (gcvit.engine.faults), None in every real run.

    Nothing here waits for the device: the guard's verdict (and the stop request `stop`, 0/1 on the
    device) travel in one all-reduce and the optimizer applies the verdict itself; the loop reads them later.
    """
    lr = p.schedule.apply(p.optimizer)
    p.clock.start()
    loss_sum, wait = torch.zeros((), device=env.device), 0.0
    for micro in range(p.accum):
        batch, waited = p.clock.next_batch(batches)
        wait += waited
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
                if injected is not None:  # a test's NaN, OOM or pause
                    loss = injected.on_loss(loss, p.schedule.step + 1, micro)
            p.scaler.scale(loss / p.accum).backward()
        if last:
            p.clock.backward_done()  # DDP's all-reduce is done (queued, on CUDA)
        loss_sum += loss.detach().float()
    p.scaler.unscale_(p.optimizer)
    grad_norm = nn.utils.clip_grad_norm_(p.model.parameters(), cfg.optim.clip_grad or float("inf"))
    with p.clock.collective():
        found_inf = p.guard.check(loss_sum, grad_norm, stop)  # a collective: every rank gets the same verdict
    # Not scaler.step(): it would replace the verdict with its own overflow flag (which the guard's grad
    # norm already covers); update() reads the flag unscale_() recorded.
    optim.step_unless(p.optimizer, found_inf)
    p.scaler.update()
    p.optimizer.zero_grad(set_to_none=True)
    p.schedule.step += 1
    if p.ema is not None:
        p.ema.update(p.model, step=p.schedule.step)
    p.clock.finish()
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


@dataclass
class Run:
    """One training run: its parts, where it stands, and what its epochs, evaluations and saves share."""

    cfg: Config
    env: DistEnv
    p: Parts
    run_dir: Path
    ckpt: CheckpointManager
    writer: metrics.MetricsWriter
    wandb: WandbLogger
    dog: Watchdog  # this rank's heartbeat and stall watchdog
    target: int  # the step the run ends at (trainer.max_steps, else the schedule's end)
    progress: Progress = field(default_factory=Progress)
    loader_state: dict[str, Any] | None = None  # the train loader's place in a resumed epoch, until used
    audit_dir: str | None = None  # where the loaders record the ids they hand out (trainer.audit)
    faults: StepFaults | None = None  # tests only: what GCVIT_TEST_* injects into the steps
    stop: StopFlag = field(default_factory=StopFlag)
    bar: metrics.Progress | None = None
    flops: float | None = None  # training FLOPs per image (CUDA only), for MFU
    peak: float | None = None  # the device's peak FLOP/s at trainer.precision, when known
    warmup_until: int = 0  # img/s leaves out the steps up to this one (compilation after a (re)start)
    compile_clock: CompileClock | None = None  # times the first compiled step, then says cold or warm

    def save(self, *tags: str, scored: dict[str, Any] | None = None) -> None:
        """Checkpoint every piece under `tags`; a collective (rank 0 writes once, the rest are hard links).
        `scored`: this step's evaluation of these very weights, None when not evaluated (read by
        gcvit.engine.pretrained: a file must not claim the score of other weights)."""
        self.dog.enter("checkpoint")
        self.p.guard.settle()  # the counters saved include every step so far (a stop policy may still raise)
        state = {**checkpoint_state(self.p, self.progress, self.wandb, self.cfg), "scored": scored}
        if self.env.is_main:
            self.ckpt.save(state, tag=tags)

    def close(self, exit_code: int) -> None:
        """Watchdog, progress bar, signal handlers and W&B, whichever way the run ends."""
        self.dog.stop()  # while the watchdog handles a stall this waits for it to end the process
        if self.bar is not None:
            self.bar.close()
        self.stop.uninstall()
        self.wandb.finish(exit_code=exit_code)


def train(cfg: Config, env: DistEnv) -> int:
    """Train with the recipe in `cfg`, resuming from the run dir's newest checkpoint when there is one."""
    run = prepare(cfg, env)
    if run is None:
        return 0
    run.stop.install()
    exit_code = 0
    try:
        while run.progress.step < run.target:
            if not run_epoch(run):
                exit_code = PREEMPTED_EXIT_CODE
                return exit_code
            end_of_epoch(run)
    finally:
        run.close(exit_code)
    if env.is_main:
        best = run.progress
        earned = f" ({best.best_weights} weights)" if best.best_weights else ""
        print(f"done: {best.step} steps, best top1 {best.best_top1:.2f}{earned}; run dir {run.run_dir}",
              flush=True)
    return 0


def prepare(cfg: Config, env: DistEnv) -> Run | None:
    """Run dir, data, model and recipe (build), auto-resume, run_info.json and W&B; None when the run in
    the run dir is finished already."""
    t = cfg.trainer
    run_dir = prepare_run_dir(cfg, env)
    cache = use_cache(cfg, run_dir) if compiles(cfg, env) else None  # before anything compiles
    data = resolve_data(cfg.data, is_main=env.is_main, local_rank=env.local_rank,
                        broadcast=distributed.broadcast_object)
    # after staging: copying and checksumming a dataset to local disk can take longer than any grace
    dog = watch(run_dir, env, t.stall_timeout, t.stall_grace)
    audit_dir = str(os.environ.get(AUDIT_ENV) or run_dir / "audit") if t.audit else None
    ckpt = CheckpointManager(run_dir / "checkpoints", keep=t.keep_checkpoints, injected=faults.save_faults())
    # auto-resume from the run dir's newest loadable checkpoint takes precedence over model.pretrained
    latest = distributed.broadcast_object(str(ckpt.latest() or "") if env.is_main else None)
    p = build(cfg, env, data, init_weights=not latest, audit_dir=audit_dir)
    p.clock.phase = dog.enter  # the heartbeat follows each step through its phases
    if p.val_loader.split_record and env.is_main:
        print(describe_split(p.val_loader.split_record), flush=True)
    run = Run(cfg, env, p, run_dir, ckpt, metrics.MetricsWriter(run_dir, env.is_main),
              WandbLogger(cfg.logger.wandb.mode, cfg.logger.wandb.project, cfg.logger.wandb.entity, run_dir,
                          env.is_main),
              dog, target=min(p.total_steps, t.max_steps or p.total_steps), audit_dir=audit_dir,
              faults=faults.step_faults())
    if latest:
        resume(run, Path(latest))
        dog.step = run.progress.step  # a stall before the first step names the step it was in
    if run.progress.step >= run.target:
        if env.is_main:
            print(f"run already finished (step {run.progress.step} of {run.target}) in {run_dir}; nothing "
                  "to do (to train on: raise trainer.max_steps, or sched.cooldown_epochs/sched.epochs with "
                  "trainer.resume=force)")
        dog.stop()
        return None
    announce(run, data.batch_size)
    run.warmup_until = run.progress.step + (COMPILE_WARMUP_STEPS if cache else 0)
    run.compile_clock = CompileClock(how(cfg, env), t.compile_mode, cache) \
        if compiled(cfg, env) and env.is_main else None
    run.bar = metrics.Progress(total=run.target, initial=run.progress.step,
                               enabled=env.is_main and cfg.logger.progress)
    p.model.train()
    return run


def resume(run: Run, path: Path) -> None:
    """Continue from checkpoint `path`: every piece's state, the metrics file and the audit trail cut
    back to its step, the loader's place kept for the epoch it was saved in."""
    env = run.env
    state = run.ckpt.load(path)
    run.progress, run.loader_state = restore(run.p, state, run.wandb, env), state["loader"]
    run.writer.truncate_after(run.progress.step)
    if run.audit_dir:
        if env.is_main:
            trim_audit(run.audit_dir, run.loader_state["epoch"], run.loader_state["position"])
        distributed.broadcast_object(None)  # no rank appends before the trim is done
    if env.is_main:
        print(f"resumed from {path} at step {run.progress.step} (epoch {run.progress.epoch})", flush=True)


def announce(run: Run, batch_size: int) -> None:
    """run_info.json and the run's one-paragraph summary (rank 0), W&B's start, the FLOPs behind MFU."""
    cfg, env, p, t = run.cfg, run.env, run.p, run.cfg.trainer
    base_lr = p.schedule.base_lr
    if env.is_main:
        n_params = sum(q.numel() for q in p.model.parameters())
        info = metrics.run_info(env.world_size, env.device, {
            "run_dir": str(run.run_dir), "num_params": n_params, "accumulation": p.accum, "lr": base_lr,
            "steps_per_epoch": p.steps_per_epoch, "total_steps": p.total_steps, "target_steps": run.target,
            "pretrained": p.start, "classes": p.train_loader.classes, "val_split": p.val_loader.split_record})
        (run.run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
        print(f"run dir: {run.run_dir}\n{n_params / 1e6:.2f}M params on {env.world_size} x {env.device}; "
              f"global batch {t.global_batch_size} = {batch_size} x {env.world_size} ranks x {p.accum} "
              f"accumulation; lr {base_lr:.3g}; {p.steps_per_epoch} steps/epoch; {run.target} steps",
              flush=True)
        if lag := ema_lag(t, run.target):
            print(lag, flush=True)
    run.wandb.start(run.run_dir.name, redact(to_container(cfg)))
    cuda = env.device.type == "cuda"
    run.flops = mfu.train_flops_per_image(p.model, cfg.model.img_size, env.device) if cuda else None
    run.peak = mfu.peak_flops(env.device, t.precision)


def run_epoch(run: Run) -> bool:
    """The optimizer steps to the end of this epoch (or of the run), with logging, periodic checkpoints and
    the stop check at every step boundary; False when a stop signal ended the run (saved in `last`)."""
    cfg, env, p, t, progress = run.cfg, run.env, run.p, run.cfg.trainer, run.progress
    epoch = progress.epoch = progress.step // p.steps_per_epoch
    p.train_loader.set_epoch(epoch)
    if run.loader_state is not None and progress.step % p.steps_per_epoch:
        p.train_loader.load_state_dict(run.loader_state)  # continue mid-epoch at the next sample
    run.loader_state = None
    batches = iter(p.train_loader)
    if run.faults is not None:  # a test's slow loader (gcvit.engine.faults)
        batches = run.faults.batches(batches)
    epoch_end = min((epoch + 1) * p.steps_per_epoch, run.target)
    # the step accounting leaves out the epoch's first step (the loader restarts) and a (re)start's compiling
    p.clock.skip(max(1, run.warmup_until - progress.step))
    window = metrics.Window(env.device)
    while progress.step < epoch_end:
        seed_step(t.seed, env.rank, progress.step)
        try:
            out = train_step(p, batches, env, cfg, run.stop.tensor(env.device), run.faults)
        except torch.OutOfMemoryError as e:
            raise StepOutOfMemory(out_of_memory(cfg, env, progress.step + 1, p.accum, e)) from None
        progress.step += 1
        run.dog.completed(progress.step)
        if run.compile_clock is not None:  # the first step after a (re)start compiled (or loaded) the graphs
            run.bar.write(run.compile_clock.report())
            run.compile_clock = None
        window.add(out["loss"], out["wait"])
        if progress.step <= run.warmup_until:
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
                                world_size=env.world_size, flops_per_image=run.flops, peak=run.peak)
            rec.update(p.clock.report())  # a gather: each rank's step split, the slowest rank and node
            run.writer.write(rec)
            run.wandb.log(rec, step=progress.step)
            run.bar.show(rec)
        # step boundary: a stop signal on any rank makes all ranks save once and exit together
        if stopping:
            run.save("last")
            if env.is_main:
                why = f"signal {run.stop.signum}" if run.stop.signum else "a stop signal on another rank"
                run.bar.write(f"{why}: saved step {progress.step} in {run.ckpt.run_dir}; "
                              f"exiting with {PREEMPTED_EXIT_CODE} so the launcher requeues")
            return False
        if periodic:
            run.save("last", f"step{progress.step:09d}")
    return True


def end_of_epoch(run: Run) -> None:
    """Evaluate model and EMA when due (every trainer.eval_every_epochs, and at the run's end), then save
    `last` and the step's tag, and `best` when the better of model and EMA beat the best so far (a slow
    EMA must not hide a better model: predict, export and model.pretrained follow the weights that won)."""
    p, t, progress = run.p, run.cfg.trainer, run.progress
    epoch = progress.epoch  # the one just trained
    progress.epoch = progress.step // p.steps_per_epoch
    tags, scored = ["last", f"step{progress.step:09d}"], None
    if progress.step >= run.target or (epoch + 1) % t.eval_every_epochs == 0:
        rec = evaluate_epoch(run, epoch)
        which = "ema" if rec.get("ema_top1", -1.0) >= rec["top1"] else "model"  # a tie keeps the EMA
        top1 = rec["ema_top1" if which == "ema" else "top1"]
        scored = {"step": progress.step, "weights": which, "top1": top1}
        if top1 > progress.best_top1:
            progress.best_top1, progress.best_weights = top1, which
            tags.append("best")
    run.save(*tags, scored=scored)


def evaluate_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """Top-1/top-5 of the model and of its EMA on the val split: logged, printed and returned."""
    env, p, precision = run.env, run.p, run.cfg.trainer.precision
    run.dog.enter("eval")
    rec: dict[str, Any] = {"kind": "eval", "step": run.progress.step, "epoch": epoch}
    res = evaluate(p.model, p.val_loader, env, precision)
    rec.update(top1=res["top1"], top5=res["top5"], count=res["count"])
    if p.ema is not None:
        res = evaluate(p.ema.module, p.val_loader, env, precision)
        rec.update(ema_top1=res["top1"], ema_top5=res["top5"])
    run.writer.write(rec)
    run.wandb.log(rec, step=run.progress.step)
    if env.is_main:
        ema_txt = f" | EMA top1 {rec['ema_top1']:.2f} top5 {rec['ema_top5']:.2f}" if p.ema else ""
        run.bar.write(f"epoch {epoch}: top1 {rec['top1']:.2f} top5 {rec['top5']:.2f}{ema_txt} "
                      f"({rec['count']} val images)")
    return rec
