"""gcvit-train: GC ViT model zoo and ImageNet training framework."""

from gcvit.models import GCViT, create_model, list_models
from gcvit.models.checkpoint import load_checkpoint

__all__ = ["GCViT", "create_model", "list_models", "load_checkpoint"]
