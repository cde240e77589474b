"""The GC ViT variants (the official configurations), without torch: config validation and the launchers
name models without importing the model code (gcvit.models builds them)."""
from __future__ import annotations

# Official hyper-parameters (NVlabs/GCVit); drop_path is the published default rate of each variant.
VARIANTS: dict[str, dict] = {
    "gcvit_xxtiny": dict(dim=64, depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16), mlp_ratio=3.0, drop_path=0.2),
    "gcvit_xtiny": dict(dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0, drop_path=0.2),
    "gcvit_tiny": dict(dim=64, depths=(3, 4, 19, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0, drop_path=0.2),
    "gcvit_tiny2": dict(dim=64, depths=(3, 4, 29, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0, drop_path=0.25),
    "gcvit_small": dict(dim=96, depths=(3, 4, 19, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2.0,
                        layer_scale=1e-5, drop_path=0.3),
    "gcvit_small2": dict(dim=96, depths=(3, 4, 23, 5), num_heads=(3, 6, 12, 24), mlp_ratio=3.0,
                         layer_scale=1e-5, drop_path=0.35),
    "gcvit_base": dict(dim=128, depths=(3, 4, 19, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2.0,
                       layer_scale=1e-5, drop_path=0.5),
    "gcvit_large": dict(dim=192, depths=(3, 4, 19, 5), num_heads=(6, 12, 24, 48), mlp_ratio=2.0,
                        layer_scale=1e-5, drop_path=0.5),
}


def list_models() -> list[str]:
    """Names accepted by create_model (the official gc_vit_* spellings work too)."""
    return list(VARIANTS)


def canonical_name(name: str) -> str:
    """'gc_vit_tiny' / 'gcvit_tiny' -> 'gcvit_tiny', or a ValueError listing the known variants."""
    key = name.replace("gc_vit_", "gcvit_").split(".")[0]
    if key not in VARIANTS:
        raise ValueError(f"unknown GC ViT variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return key
