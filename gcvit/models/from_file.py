"""A ready model from any checkpoint file the project reads, with the preprocessing it was trained for.

Tools that take a checkpoint and nothing else (export, predict) need the variant, the resolution and the
val transform without a config: the variant is read off the tensor shapes, the rest from our run
checkpoints' saved config when there is one, else the published ImageNet defaults.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from data.config import IMAGENET_MEAN, IMAGENET_STD
from gcvit.models.checkpoint import (
    CheckpointLoadError,
    describe,
    detect_format,
    fit_state_dict,
    infer_config,
    safe_load,
    unwrap,
)
from gcvit.models.gcvit import GCViT

WEIGHTS = ("auto", "ema", "model")


@dataclass
class Preprocessing:
    """What a deployer must do to an image before the model sees it (timm's eval transform)."""

    img_size: int  # square input side
    crop_pct: float = 0.875  # resize the shorter side to img_size / crop_pct, then center crop
    interpolation: str = "bicubic"  # resize filter
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # of RGB in [0, 1]
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    class_names: list[str] | None = None  # index -> name, when the checkpoint carries them


@dataclass
class LoadedModel:
    """The model in eval mode, where its weights came from, and its preprocessing."""

    model: GCViT
    variant: str  # e.g. "gcvit_tiny (dim 64, depths (3, 4, 19, 5), ...)"
    weights: str  # "ema", "model" or "weights" (a plain state dict)
    preprocessing: Preprocessing

    def summary(self) -> dict[str, Any]:
        return {"variant": self.variant, "weights": self.weights, **asdict(self.preprocessing)}


def _run_state(obj: dict[str, Any], weights: str, where: str) -> tuple[dict[str, Any], str]:
    """The state dict a run checkpoint holds under `weights` (auto: EMA when the run kept one)."""
    if weights == "model" or (weights == "auto" and not obj.get("ema")):
        return obj["model"], "model"
    if not obj.get("ema"):
        raise CheckpointLoadError(f"{where} has no EMA weights (the run had trainer.ema_decay=0); "
                                  "use weights=model")
    return obj["ema"], "ema"


def model_from_file(path: str | Path, *, img_size: int | None = None, weights: str = "auto") -> LoadedModel:
    """Build the GC ViT a checkpoint (official, timm, native or one of our runs) holds, at `img_size`
    (default: the checkpoint's own; another size resamples the position tables), in eval mode."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} is not one of {', '.join(WEIGHTS)}")
    where = f"checkpoint {path}"
    obj = safe_load(path)
    run_cfg: dict[str, Any] = {}
    if isinstance(obj.get("model"), dict) and "progress" in obj:  # one of our run checkpoints
        run_cfg = obj.get("config") or {}
        state, used = _run_state(obj, weights, where)
    else:
        state, used = obj, "weights"
    raw = unwrap(state)
    detect_format(raw, where)
    try:
        arch = infer_config(raw)
    except (StopIteration, KeyError):
        raise CheckpointLoadError(f"{where} is not a complete GC ViT state dict ({describe(raw)})") from None
    trained_size = (run_cfg.get("model") or {}).get("img_size") or arch["img_size"]
    arch["img_size"] = img_size or trained_size
    if arch["img_size"] != trained_size:
        arch.pop("window_size")  # the variant's windows for the new size; the tables are resampled
    model = GCViT(**arch)
    model.load_state_dict(fit_state_dict(state, model, where), strict=True)
    data_cfg = run_cfg.get("data") or {}
    prep = Preprocessing(img_size=arch["img_size"], crop_pct=data_cfg.get("crop_pct", 0.875),
                         interpolation=data_cfg.get("interpolation", "bicubic"),
                         class_names=obj.get("class_names") or run_cfg.get("class_names"))
    return LoadedModel(model.eval(), describe(raw), used, prep)


def example_batch(n: int, img_size: int, seed: int = 0) -> torch.Tensor:
    """A reproducible normalised-looking input batch for checks that compare two runtimes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, img_size, img_size, generator=g)
