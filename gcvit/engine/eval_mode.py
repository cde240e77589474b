"""mode=eval: score a checkpoint on every set of eval.sets, print a table, write the results file.

Every set is read with the val transform at model.img_size and data.crop_pct (so a 224-trained model can be
scored at 256 or 288: create_model resamples the position tables), every image exactly once across ranks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from gcvit.config import Config, to_container
from gcvit.engine import distributed, eval_report
from gcvit.engine.checkpoint import CheckpointManager
from gcvit.engine.compile import compile_model, compiles, how, kernels, use_cache
from gcvit.engine.distributed import DistEnv
from gcvit.engine.eval_scores import loader_set, lowest_classes, predict, score
from gcvit.engine.pretrained import earned_best
from gcvit.engine.run_dir import run_dir_for, trained_run_dir
from gcvit.engine.wandb_logger import WandbLogger
from gcvit.models import create_model
from gcvit.models.checkpoint import load_checkpoint, safe_load
from gcvit.models.hub import is_named, resolve
from gcvit_data.eval_sets import EvalSet, build_eval_set, real_labels, timm_info
from gcvit_data.loaders import build_loader
from gcvit_data.resolve import resolve_data
from gcvit_data.split import describe as describe_split


def _checkpoint(cfg: Config, env: DistEnv) -> tuple[Path, Path]:
    """(the checkpoint to score, the run dir its results go to)."""
    if is_named(cfg.checkpoint):  # fetched once per node; the Hub's or torch.hub's cache is no run's dir
        return Path(resolve(cfg.checkpoint, "checkpoint", env.local_rank)), run_dir_for(cfg)
    if cfg.checkpoint:
        # not resolved: a link (a Hub snapshot's file) keeps the suffix that says how to load it
        path = Path(cfg.checkpoint).expanduser().absolute()
        # runs/<name>/checkpoints/last.pt: the results belong with that run
        return path, path.parent.parent if path.parent.name == "checkpoints" else run_dir_for(cfg)
    run_dir = trained_run_dir(cfg)
    path = CheckpointManager(run_dir / "checkpoints").latest()
    if path is None:
        raise SystemExit(f"config error: checkpoint is not set and {run_dir} holds no checkpoint; "
                         "pass checkpoint=PATH or trainer.output_dir=RUN_DIR")
    return Path(path), run_dir


def _check_classes(trained_on: list[str] | None, loader: Any, path: Path, root: str | None) -> None:
    """The labels would mean other classes than the head's outputs: any accuracy would be meaningless."""
    if not (trained_on and loader.classes) or list(trained_on) == list(loader.classes):
        return
    diff = next((i for i, (a, b) in enumerate(zip(trained_on, loader.classes)) if a != b),
                min(len(trained_on), len(loader.classes)))
    raise SystemExit(f"config error: {path} was trained on {len(trained_on)} classes that are not "
                     f"{root}'s {len(loader.classes)} (class {diff}: {_name(trained_on, diff)} vs "
                     f"{_name(loader.classes, diff)}); evaluate it on its own dataset, or fine-tune it with "
                     "model.pretrained")


def _name(classes: list[str], i: int) -> str:
    """Class i's name, quoted, or 'none' past the end."""
    return repr(classes[i]) if i < len(classes) else "none"


def _val_loader(cfg: Config, data: Any, env: DistEnv, index: Any = None) -> Any:
    """The val transform at model.img_size / data.crop_pct over data.root's val split, or over `index`."""
    return build_loader(data, cfg.aug, split="val", img_size=cfg.model.img_size, seed=cfg.trainer.seed,
                        rank=env.rank, world_size=env.world_size, device=env.device,
                        precision=cfg.trainer.precision, index=index)


def _sets(cfg: Config, env: DistEnv, classes: list[str] | None, val_loader: Any) -> list[tuple[EvalSet, Any]]:
    """Each requested set with its loader; val and real share the val split's loader."""
    out = []
    for name in cfg.eval.sets:
        if name in ("val", "real"):
            real = real_labels(val_loader.index, cfg.eval.real_labels) if name == "real" else None
            out.append((loader_set(name, val_loader, classes, real), val_loader))
            continue
        eset = build_eval_set(name, data_root=None, set_root=getattr(cfg.eval, f"{name}_root"),
                              classes=classes or [], index_cache=cfg.data.index_cache)
        out.append((eset, _val_loader(cfg, cfg.data, env, eset.index)))
    return out


def evaluate_only(cfg: Config, env: DistEnv) -> int:
    """Load the checkpoint (official, timm or ours; model and EMA weights) and score it on eval.sets."""
    path, run_dir = _checkpoint(cfg, env)
    state = safe_load(str(path))
    ours = isinstance(state.get("model"), dict) and "progress" in state
    trained_on = state.get("classes") if ours else None
    val_loader = None
    if {"val", "real"} & set(cfg.eval.sets):
        data = resolve_data(cfg.data, is_main=env.is_main, local_rank=env.local_rank,
                            broadcast=distributed.broadcast_object)
        val_loader = _val_loader(cfg, data, env)
        if val_loader.split_record and env.is_main:
            print(describe_split(val_loader.split_record), flush=True)
        _check_classes(trained_on, val_loader, path, data.root)
        classes = val_loader.classes
        num_classes = val_loader.num_classes
    else:  # ImageNet-1K sets only: the model's classes are the checkpoint's, else ImageNet's
        classes = list(trained_on) if trained_on else timm_info("imagenet_synsets.txt").split()
        num_classes = len(classes)
    sets = _sets(cfg, env, classes, val_loader)
    model = create_model(cfg.model.name, num_classes=num_classes, img_size=cfg.model.img_size,
                         **cfg.model.overrides).to(env.device)
    model.set_kernels(*kernels(cfg, env, training=False))
    if compiles(cfg, env):  # the training run's cache: its evaluations compiled these graphs
        use_cache(cfg, run_dir)
    net = compile_model(model, model, how(cfg, env), cfg.trainer.compile_mode)  # the path training takes
    rows: list[dict[str, Any]] = []
    for which in _weights(state, path, env.is_main) if ours else ("model",):
        load_checkpoint(model, state[which] if ours else state)
        for eset, loader in sets:
            preds = predict(net, loader, env, cfg.trainer.precision, eset.subset)
            if env.is_main:
                rows.append({"set": eset.name, "weights": which, **score(eset, preds)})
                _print_row(rows[-1], path)
    if env.is_main:
        _report(cfg, env, rows, path, run_dir)
    return 0


def _weights(state: dict[str, Any], path: Path, verbose: bool) -> tuple[str, ...]:
    """The weight sets of one of our checkpoints to score: the set `best` means for this file first (what
    predict, export and model.pretrained take by default; one line says which and why), then the other."""
    if not state.get("ema"):
        return ("model",)
    which, earned = earned_best(state)
    if verbose:
        why = f": {earned}" if earned else " (the file records no evaluation: the EMA)"
        print(f"eval: predict, export and model.pretrained take the {which} weights of {path}{why}",
              flush=True)
    return (which, "model" if which == "ema" else "ema")


def _print_row(row: dict[str, Any], path: Path) -> None:
    rate = f"  {row['img_per_s']:,.0f} img/s" if row["img_per_s"] else ""
    print(f"eval {row['weights']} weights of {path} on {row['set']}: top1 {row['top1']:.3f}  "
          f"top5 {row['top5']:.3f}  count {row['count']}{rate}", flush=True)
    if row.get("per_class"):
        print(f"  lowest top1 by class ({row['weights']}): {lowest_classes(row['per_class'])}", flush=True)


def _report(cfg: Config, env: DistEnv, rows: list[dict[str, Any]], path: Path, run_dir: Path) -> None:
    """The summary table, the results file, and a W&B table when W&B is on."""
    print(eval_report.table(rows), flush=True)
    report = eval_report.build(rows, checkpoint=path, model=cfg.model.name, img_size=cfg.model.img_size,
                               crop_pct=cfg.data.crop_pct, interpolation=cfg.data.interpolation,
                               precision=cfg.trainer.precision, world_size=env.world_size, device=env.device)
    out = eval_report.results_path(run_dir, path, cfg.eval.results_file)
    eval_report.write(report, out)
    print(f"results: {out}", flush=True)
    w = cfg.logger.wandb
    wandb = WandbLogger(w.mode, w.project, w.entity, run_dir, enabled=True)
    wandb.start(f"{cfg.name}-eval-{path.stem}", to_container(cfg))
    wandb.table("eval", list(eval_report.COLUMNS), [[r[c] for c in eval_report.COLUMNS] for r in rows])
    wandb.finish()
