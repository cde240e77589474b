"""The GC ViT model zoo: create_model, the factory of the variants named in gcvit/variants.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gcvit.models.checkpoint import load_checkpoint
from gcvit.models.gcvit import GCViT
from gcvit.variants import VARIANTS, canonical_name, list_models

__all__ = ["GCViT", "canonical_name", "create_model", "list_models"]


def create_model(name: str, *, num_classes: int = 1000, img_size: int = 224,
                 drop_path_rate: float | None = None, checkpoint: str | Path | dict | None = None,
                 **overrides: Any) -> GCViT:
    """Build a variant; overrides (dim, depths, num_heads, window_size, mlp_ratio, ...) change its shape."""
    cfg = dict(VARIANTS[canonical_name(name)])
    default_dpr = cfg.pop("drop_path")
    cfg.update(overrides)
    try:
        model = GCViT(**cfg, img_size=img_size, num_classes=num_classes,
                      drop_path_rate=default_dpr if drop_path_rate is None else drop_path_rate)
    except TypeError as e:
        raise TypeError(f"create_model({name!r}): {e}; valid overrides are the keyword arguments of "
                        "gcvit.models.GCViT") from None
    model.pretrained_cfg["architecture"] = canonical_name(name)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model
