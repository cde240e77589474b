"""Exact top-1/top-5 over a val split, and mode=eval (evaluate a checkpoint file)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

import gcvit
from data.loaders import build_loader
from data.split import describe as describe_split
from gcvit.config import Config
from gcvit.engine import distributed
from gcvit.engine.checkpoint import CheckpointManager
from gcvit.engine.distributed import DistEnv
from gcvit.engine.setup import autocast, resolve_data, trained_run_dir


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, env: DistEnv, precision: str) -> dict[str, float]:
    """Exact top-1/top-5 over the val split; counts are reduced once, ids prove every image came once."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=env.device)  # correct@1, correct@5, seen
    per_class = torch.zeros(2, loader.num_classes, dtype=torch.float64, device=env.device)  # top-1 hits, seen
    ids = [torch.zeros(0, dtype=torch.int64)]
    for batch in loader:
        with autocast(env.device, precision):
            logits = model(batch.images)
        hit = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == batch.labels[:, None]
        counts[0] += hit[:, 0].sum()
        counts[1] += hit.any(dim=-1).sum()
        counts[2] += len(hit)
        per_class[0].index_add_(0, batch.labels, hit[:, 0].double())
        per_class[1].index_add_(0, batch.labels, torch.ones_like(hit[:, 0], dtype=torch.float64))
        ids.append(batch.ids)
    model.train(was_training)
    distributed.all_reduce_sum(counts)
    distributed.all_reduce_sum(per_class)
    gathered = distributed.gather_object(torch.cat(ids))
    distinct = distributed.broadcast_object(int(torch.cat(gathered).unique().numel()) if gathered else 0)
    c1, c5, seen = counts.tolist()
    if distinct != int(seen):
        raise RuntimeError(f"the val loader yielded {int(seen)} images but {distinct} distinct ids; every "
                           "val image must come exactly once across ranks")
    return {"top1": 100.0 * c1 / max(seen, 1), "top5": 100.0 * c5 / max(seen, 1), "count": distinct,
            "per_class": per_class.cpu()}


def worst_classes(per_class: torch.Tensor, classes: list[str], n: int = 5) -> str:
    """'name top1% (images), ...' for the n classes with the lowest top-1 among those with val images."""
    seen = per_class[1] > 0
    acc = torch.where(seen, 100.0 * per_class[0] / per_class[1].clamp(min=1), torch.inf)
    order = acc.argsort()[: min(n, int(seen.sum()))].tolist()
    return ", ".join(f"{classes[i]} {acc[i]:.1f}% ({int(per_class[1, i])})" for i in order)

def evaluate_only(cfg: Config, env: DistEnv) -> int:
    """mode=eval: load `checkpoint` (official, timm or ours) and print exact top-1/top-5 on the val split."""
    data = resolve_data(cfg, env)
    loader = build_loader(data, cfg.aug, split="val", img_size=cfg.model.img_size,
                          seed=cfg.trainer.seed, rank=env.rank, world_size=env.world_size, device=env.device,
                          precision=cfg.trainer.precision)
    if loader.split_record and env.is_main:
        print(describe_split(loader.split_record, data.root), flush=True)
    run_dir = trained_run_dir(cfg) if cfg.checkpoint is None else None
    path = cfg.checkpoint or CheckpointManager(run_dir / "checkpoints").latest()
    if path is None:
        raise SystemExit(f"config error: checkpoint is not set and {run_dir} holds no checkpoint; "
                         "pass checkpoint=PATH or trainer.output_dir=RUN_DIR")
    model = gcvit.create_model(cfg.model.name, num_classes=loader.num_classes, img_size=cfg.model.img_size,
                               **cfg.model.overrides)
    state = gcvit.models.checkpoint.safe_load(str(path))
    ours = isinstance(state.get("model"), dict) and "progress" in state
    trained_on = state.get("classes") if ours else None
    if trained_on and loader.classes and list(trained_on) != list(loader.classes):
        # the labels would mean other classes than the head's outputs: any accuracy would be meaningless
        diff = next((i for i, (a, b) in enumerate(zip(trained_on, loader.classes)) if a != b),
                    min(len(trained_on), len(loader.classes)))
        raise SystemExit(f"config error: {path} was trained on {len(trained_on)} classes that are not "
                         f"{data.root}'s {len(loader.classes)} (class {diff}: "
                         f"{_name(trained_on, diff)} vs {_name(loader.classes, diff)}); evaluate it on its "
                         "own dataset, or fine-tune it with model.pretrained")
    for which in ("model", "ema") if ours and state.get("ema") else ("model",):
        gcvit.load_checkpoint(model, state[which] if ours else state)
        res = evaluate(model.to(env.device), loader, env, cfg.trainer.precision)
        if env.is_main:
            print(f"eval {which} weights of {path}: top1 {res['top1']:.3f}  top5 {res['top5']:.3f}  "
                  f"count {res['count']}", flush=True)
            if loader.classes:
                print(f"  lowest top1 by class ({which}): {worst_classes(res['per_class'], loader.classes)}",
                      flush=True)
    return 0


def _name(classes: list[str], i: int) -> str:
    """Class i's name, quoted, or 'none' past the end."""
    return repr(classes[i]) if i < len(classes) else "none"
