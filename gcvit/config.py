"""Typed configuration of a run (the schema behind conf/) and its start-up checks."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from gcvit.config_help import help_template
from gcvit.kernel_choices import ATTENTION_KINDS, COMPILE_KINDS, COMPILE_MODES, NORM_KINDS
from gcvit.variants import VARIANTS
from gcvit_data.config import DALI_DEVICES, EVAL_SETS, INTERPOLATIONS, LOADERS, AugConfig, DataConfig

# model.freeze: the parts that stay fixed, from the stem up (backbone = everything but the head)
FREEZE = ("stem", "stage1", "stage2", "stage3", "stage4", "backbone")


@dataclass
class ModelConfig:
    """Which GC ViT to build."""

    name: str = "gcvit_tiny"  # a name from gcvit.list_models()
    img_size: int = 224  # square input resolution
    drop_path_rate: float | None = None  # stochastic depth; null = the variant's rate (gcvit/variants.py)
    grad_checkpointing: bool = False  # recompute activations in backward to save memory
    overrides: dict[str, Any] = field(default_factory=dict)  # architecture overrides for reduced models
    pretrained: str | None = None  # starting weights: NVlabs/timm/our file, timm:NAME, hf-hub:ORG/REPO
    pretrained_weights: str = "best"  # of a file with both: best (the set that earned its best) | ema | model
    head_init_scale: float = 0.001  # re-initialised classifier: trunc-normal std .02 times this (timm)
    freeze: str | None = None  # train only what follows: stem | stage1..stage4 (a prefix) | backbone (probe)
    attention: str = "auto"  # attention kernel: auto (math on CPU, sdpa on CUDA) | sdpa | flex | math
    norm: str = "auto"  # LayerNorm under autocast: auto (fp32) | fp32 | fast (bf16/fp16 in, fp32 stats)


@dataclass
class OptimConfig:
    """AdamW and gradient clipping."""

    lr: float = 1e-3  # peak lr at `lr_batch_size` global samples per step (paper: 1e-3 at 1024)
    lr_batch_size: int = 1024  # reference global batch of `lr`; the lr used is lr * global_batch / this
    weight_decay: float = 0.05  # decoupled weight decay (not on norms, biases, rel-pos tables)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW moment decays
    eps: float = 1e-8  # AdamW denominator epsilon
    clip_grad: float | None = 5.0  # max global grad L2 norm; null disables clipping
    impl: str = "torch"  # torch (fused AdamW kernels, CPU and CUDA) | apex (FusedAdam)
    layer_decay: float | None = None  # layer-wise lr decay: layer i of n gets lr x this^(n-1-i); null = off


@dataclass
class SchedConfig:
    """Per-step lr schedule, quoted in epochs."""

    epochs: int = 300  # epochs of warmup + cosine decay
    warmup_epochs: float = 20  # linear warmup from warmup_lr, counted inside `epochs`
    cooldown_epochs: int = 10  # extra epochs at min_lr after the cosine
    warmup_lr: float = 1e-6  # lr of the first step
    min_lr: float = 5e-6  # lr at the end of the cosine and through the cooldown


# Seconds a collective waits for the other ranks before it fails (gcvit.engine.distributed.init).
PROCESS_GROUP_TIMEOUT_S = 1800


@dataclass
class TrainerConfig:
    """How the loop runs."""

    max_steps: int | None = None  # stop after this many optimizer steps (the schedule is unchanged)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "bf16"  # fp32 | bf16 | fp16 (autocast; fp16 adds a grad scaler)
    compile: str = "off"  # torch.compile: off | model | blocks (each block shape once) | auto (CUDA: model)
    compile_mode: str = "default"  # default | max-autotune-no-cudagraphs | reduce-overhead (CUDA graphs)
    compile_cache: str | None = None  # inductor/AOTAutograd cache dir; null = RUN_DIR/compile-cache
    global_batch_size: int = 1024  # samples per optimizer step over all ranks (accumulation fills the gap)
    ckpt_every_steps: int = 1000  # save `last` this often (and at every epoch end); 0 = epoch ends only
    keep_checkpoints: int = 3  # step-tagged checkpoints kept besides `last` and `best`
    seed: int = 0  # base seed; every optimizer step reseeds each rank from (seed, rank, step)
    deterministic: bool = False  # deterministic kernels, so a resumed run repeats bit for bit
    output_dir: str | None = None  # run directory; null = runs/<name>[-<SLURM_JOB_ID>]
    resume: str = "auto"  # auto: resume only the recorded recipe (docs/training.md) | force: resume anyway
    audit: bool = False  # loaders record every sample id, to check exactly-once coverage
    log_every_steps: int = 50  # metrics.jsonl / W&B train record interval
    eval_every_epochs: int = 1  # validate every N epochs (and after the last)
    ema_decay: float | None = 0.9998  # EMA of weights (evaluated, checkpointed); null disables
    ema_warmup: bool = False  # ramp the EMA decay up from 0 (timm ModelEmaV3 warmup) for short runs
    threads: int | None = None  # CPU threads per process; null = torch's default
    nonfinite_policy: str = "stop"  # non-finite loss/grads skip the step; `stop` also ends a bad streak
    nonfinite_max_consecutive: int = 5  # bad steps in a row before `stop` raises
    stall_timeout: float | None = None  # s with no step done before a hung job ends; null = auto, 0 = off
    stall_grace: float = 600.0  # s allowed instead at startup/compilation, evaluation, checkpoint saves
    straggler_ratio: float = 1.2  # a rank whose own step is this many x the others' median is slow
    straggler_windows: int = 3  # log windows a rank stays slow (same cause) before a WARN line names it


@dataclass
class WandbConfig:
    """Weights & Biases (rank 0)."""

    mode: str = "disabled"  # online | offline (no network, sync later) | disabled
    project: str = "gcvit-train"  # W&B project
    entity: str | None = None  # W&B team or user; null = the account default


@dataclass
class LoggerConfig:
    """Where progress goes."""

    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases settings
    progress: bool = True  # tqdm progress bar on rank 0


@dataclass
class EvalConfig:
    """mode=eval: which sets to score (their rules: data/eval_sets.py), where they are, where results go."""

    sets: list[str] = field(default_factory=lambda: ["val"])  # any of val real v2 a r sketch
    real_labels: str | None = None  # ImageNet-ReaL label file (real.json); null = the copy timm ships
    v2_root: str | None = None  # ImageNetV2 folder: class-index folders 0..999
    a_root: str | None = None  # ImageNet-A folder: wnid folders of its 200 classes
    r_root: str | None = None  # ImageNet-R folder: wnid folders of its 200 classes
    sketch_root: str | None = None  # ImageNet-Sketch folder: wnid folders of the 1000 classes
    results_file: str | None = None  # results JSON; null = RUN_DIR/eval/<checkpoint file stem>.json


@dataclass
class Config:
    """One run."""

    name: str = "${model.name}"  # experiment name; names the run directory (default: the model name)
    mode: str = "train"  # train | eval
    checkpoint: str | None = None  # mode=eval: the weights to evaluate: a file, timm:NAME, hf-hub:ORG/REPO
    model: ModelConfig = field(default_factory=ModelConfig)  # architecture
    data: DataConfig = field(default_factory=DataConfig)  # dataset and loader (gcvit_data.config)
    aug: AugConfig = field(default_factory=AugConfig)  # augmentation and label smoothing (gcvit_data.config)
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer
    sched: SchedConfig = field(default_factory=SchedConfig)  # lr schedule
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # loop
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # logging
    eval: EvalConfig = field(default_factory=EvalConfig)  # mode=eval: sets and results file


DEMO_DEFAULT = "experiment=demo"
# Overrides that choose what is trained; any of them means the paper's recipe, not the demo.
_CHOOSERS = ("experiment", "debug", "model", "data", "model.name", "data.root")


def register() -> None:
    """Make the schema available to conf/config.yaml as `base_config`, and `--help` as hydra/help=gcvit."""
    ConfigStore.instance().store(name="base_config", node=Config)
    ConfigStore.instance().store(group="hydra/help", name="gcvit", node={"template": help_template(Config)})


def with_demo_default(args: list[str]) -> list[str]:
    """train.py's arguments, with `experiment=demo` added when none names a model, data set or preset.

    The demo pins a reduced model, CPU and fp32; as the default of an empty choice (not an entry of
    conf/config.yaml's defaults) it can never leak into a run that chose its model or data.
    """
    overrides = [i for i, a in enumerate(args) if "=" in a and not a.startswith("-")]
    keys = {args[i].split("=", 1)[0].lstrip("+~") for i in overrides}
    other_config = any(a.startswith(("--config-name", "-cn", "--config-dir", "-cd")) for a in args)
    if keys & set(_CHOOSERS) or other_config:
        return list(args)
    at = overrides[0] if overrides else len(args)  # beside the other overrides: Hydra's parser wants them so
    return [*args[:at], DEMO_DEFAULT, *args[at:]]


def _fail(key: str, value: Any, allowed: str) -> None:
    raise SystemExit(f"config error: {key}={value!r} is invalid; allowed: {allowed}")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        _fail(key, value, allowed)


def _one_of(key: str, value: Any, choices: Iterable[str]) -> None:
    choices = list(choices)
    _check(value in choices, key, value, " | ".join(choices))


def validate(cfg: Config, known_models: Callable[[], list[str]]) -> Config:
    """Check every value the loop relies on; the first bad one exits with one line naming it."""
    _one_of("mode", cfg.mode, ("train", "eval"))
    _one_of("model.name", cfg.model.name, known_models())
    _check(cfg.model.img_size > 0, "model.img_size", cfg.model.img_size, "a positive integer")
    dpr = cfg.model.drop_path_rate
    _check(dpr is None or 0.0 <= dpr < 1.0, "model.drop_path_rate", dpr, "null or a float in [0, 1)")
    _check(cfg.mode == "eval" or cfg.checkpoint is None, "checkpoint", cfg.checkpoint,
           "null in mode=train (it names the weights of mode=eval); to start training from a checkpoint "
           "use model.pretrained=PATH (an initialisation: optimizer, schedule and data start fresh; a run "
           "resumes from its own run dir by itself)")
    _one_of("model.pretrained_weights", cfg.model.pretrained_weights, ("best", "ema", "model"))
    _check(cfg.model.freeze in (None, *FREEZE), "model.freeze", cfg.model.freeze,
           "null | " + " | ".join(FREEZE))
    _one_of("model.attention", cfg.model.attention, ATTENTION_KINDS)
    _one_of("model.norm", cfg.model.norm, NORM_KINDS)
    _check(cfg.model.head_init_scale > 0, "model.head_init_scale", cfg.model.head_init_scale,
           "a positive float")
    _check(cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "a positive float")
    _check(cfg.optim.lr_batch_size > 0, "optim.lr_batch_size", cfg.optim.lr_batch_size, "a positive integer")
    _check(cfg.optim.weight_decay >= 0, "optim.weight_decay", cfg.optim.weight_decay, "a float >= 0")
    _check(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas",
           cfg.optim.betas, "two floats in [0, 1)")
    clip = cfg.optim.clip_grad
    _check(clip is None or clip > 0, "optim.clip_grad", clip, "null or a positive float")
    _one_of("optim.impl", cfg.optim.impl, ("torch", "apex"))
    ld = cfg.optim.layer_decay
    _check(ld is None or 0 < ld <= 1, "optim.layer_decay", ld, "null or a float in (0, 1]")
    _check(cfg.sched.epochs > 0, "sched.epochs", cfg.sched.epochs, "a positive integer")
    _check(0 <= cfg.sched.warmup_epochs <= cfg.sched.epochs, "sched.warmup_epochs", cfg.sched.warmup_epochs,
           f"a number in [0, sched.epochs={cfg.sched.epochs}]")
    s = cfg.sched
    _check(s.cooldown_epochs >= 0, "sched.cooldown_epochs", s.cooldown_epochs, "an integer >= 0")
    _check(s.min_lr >= 0, "sched.min_lr", s.min_lr, "a float >= 0")
    _check(s.warmup_lr >= 0, "sched.warmup_lr", s.warmup_lr, "a float >= 0")
    t = cfg.trainer
    _one_of("trainer.device", t.device, ("auto", "cpu", "cuda"))
    _one_of("trainer.precision", t.precision, ("fp32", "bf16", "fp16"))
    _one_of("trainer.compile", t.compile, COMPILE_KINDS)
    _one_of("trainer.compile_mode", t.compile_mode, COMPILE_MODES)
    _check(t.max_steps is None or t.max_steps > 0, "trainer.max_steps", t.max_steps,
           "null or a positive integer")
    _check(t.global_batch_size > 0 and t.global_batch_size % cfg.data.batch_size == 0,
           "trainer.global_batch_size", t.global_batch_size,
           f"a positive multiple of data.batch_size={cfg.data.batch_size} (x world size)")
    _check(t.ckpt_every_steps >= 0, "trainer.ckpt_every_steps", t.ckpt_every_steps, "an integer >= 0")
    _check(t.keep_checkpoints >= 1, "trainer.keep_checkpoints", t.keep_checkpoints, "an integer >= 1")
    _check(t.log_every_steps > 0, "trainer.log_every_steps", t.log_every_steps, "a positive integer")
    _check(t.eval_every_epochs > 0, "trainer.eval_every_epochs", t.eval_every_epochs, "a positive integer")
    ema = t.ema_decay
    _check(ema is None or 0 < ema < 1, "trainer.ema_decay", ema, "null or a float in (0, 1)")
    _check(t.threads is None or t.threads > 0, "trainer.threads", t.threads, "null or a positive integer")
    _one_of("trainer.resume", t.resume, ("auto", "force"))
    _one_of("trainer.nonfinite_policy", t.nonfinite_policy, ("skip", "stop"))
    _check(t.nonfinite_max_consecutive >= 1, "trainer.nonfinite_max_consecutive", t.nonfinite_max_consecutive,
           "an integer >= 1")
    most = PROCESS_GROUP_TIMEOUT_S // 2  # the watchdog must act well before a collective gives up
    _check(t.stall_timeout in (None, 0) or 5 <= t.stall_timeout <= most, "trainer.stall_timeout",
           t.stall_timeout, f"null (auto), 0 (off) or seconds in [5, {most}] (collectives fail after "
           f"{PROCESS_GROUP_TIMEOUT_S} s)")
    _check(5 <= t.stall_grace <= most, "trainer.stall_grace", t.stall_grace, f"seconds in [5, {most}]")
    _check(1 < t.straggler_ratio < float("inf"), "trainer.straggler_ratio", t.straggler_ratio,
           "a finite float > 1")
    _check(t.straggler_windows >= 1, "trainer.straggler_windows", t.straggler_windows, "an integer >= 1")
    _one_of("logger.wandb.mode", cfg.logger.wandb.mode, ("online", "offline", "disabled"))
    d = cfg.data
    _one_of("data.loader", d.loader, LOADERS)
    _one_of("data.dali_device", d.dali_device, DALI_DEVICES)
    _one_of("data.interpolation", d.interpolation, INTERPOLATIONS)
    _check(d.batch_size > 0, "data.batch_size", d.batch_size, "a positive integer")
    # a feeder worker is a process per rank: more than the node's CPUs only thrash (the default always fits)
    cpus = max(os.cpu_count() or 1, DataConfig.feeder_workers)
    _check(0 <= d.feeder_workers <= cpus, "data.feeder_workers", d.feeder_workers,
           f"an integer in [0, {cpus}] (this node's CPUs): DALI feeder processes per rank, 2 is the default, "
           "0 feeds DALI from the training process")
    _check(0 <= d.hw_decoder_load <= 1, "data.hw_decoder_load", d.hw_decoder_load,
           "a fraction in [0, 1]: the share of JPEGs the GPU's hardware decoder takes (0 turns it off)")
    _check(d.val_split is None or 0 < d.val_split < 1, "data.val_split", d.val_split,
           "null or a fraction in (0, 1) of ROOT/train to hold out as val")
    _check(not (d.val_split and d.val_list), "data.val_split", d.val_split,
           f"null while data.val_list={d.val_list} gives the val images (one source of val images)")
    for name in cfg.eval.sets:
        _one_of("eval.sets", name, EVAL_SETS)
    for name in ("v2", "a", "r", "sketch"):
        root = getattr(cfg.eval, f"{name}_root")
        _check(name not in cfg.eval.sets or bool(root), f"eval.{name}_root", root,
               f"the {name} set's folder (eval.sets names {name})")
    external_only = cfg.mode == "eval" and not {"val", "real"} & set(cfg.eval.sets)
    has_images = d.loader == "synthetic" or bool(d.root) or bool(d.train_list) or d.demo
    _check(has_images or external_only, "data.root", d.root,
           "a dataset root (ROOT/train/<wnid>/*.JPEG, ROOT/val/<wnid>/*.JPEG); or data=demo | data=synthetic")
    mixing = cfg.aug.mixup > 0 or cfg.aug.cutmix > 0
    _check(not mixing or cfg.data.batch_size % 2 == 0, "data.batch_size", cfg.data.batch_size,
           "an even number while aug.mixup/aug.cutmix are on (timm Mixup pairs samples)")
    return cfg


def from_hydra(cfg: DictConfig, known_models: Callable[[], list[str]]) -> Config:
    """The validated dataclass behind a composed Hydra config."""
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, Config):
        raise SystemExit("config error: the composed config is not based on `base_config`; keep "
                         "`- base_config` first in conf/config.yaml's defaults")
    cfg = validate(obj, known_models)
    if cfg.model.drop_path_rate is None:  # resolved here, so checkpoints and recipes record the rate used
        cfg.model.drop_path_rate = VARIANTS[cfg.model.name]["drop_path"]
    return cfg


def to_container(cfg: Config) -> dict[str, Any]:
    """Plain dict of the resolved config (for checkpoints, W&B and .hydra/config.yaml)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
