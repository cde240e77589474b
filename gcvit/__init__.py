"""gcvit-train: GC ViT model zoo and ImageNet training framework.

The model API is imported on first use, so that `import gcvit.config` (how every train.py run starts, and
what each DALI feeder worker re-imports) costs no torch or timm import: a config error then fails in a
fraction of a second, and the workers stay small."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gcvit.models import GCViT, create_model
    from gcvit.models.checkpoint import load_checkpoint
    from gcvit.variants import list_models

_HOME = {"GCViT": "gcvit.models", "create_model": "gcvit.models", "list_models": "gcvit.variants",
         "load_checkpoint": "gcvit.models.checkpoint"}
__all__ = ["GCViT", "create_model", "list_models", "load_checkpoint"]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    if name == "models":  # `import gcvit; gcvit.models.checkpoint...` keeps working
        return importlib.import_module("gcvit.models")
    raise AttributeError(f"module 'gcvit' has no attribute {name!r}")
