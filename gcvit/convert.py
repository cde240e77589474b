"""Convert GC ViT checkpoints between the native, timm and official NVlabs formats (.pth / .safetensors)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from gcvit.models.checkpoint import (
    FORMATS,
    CheckpointError,
    describe,
    detect_format,
    fit_state_dict,
    from_native,
    infer_config,
    safe_load,
    unwrap,
)
from gcvit.models.gcvit import GCViT


def convert(src: Path, dst: Path, to: str) -> str:
    """Rewrite src as dst in format `to`; returns a one-line summary."""
    obj = safe_load(src)
    raw = unwrap(obj)
    fmt = detect_format(raw, f"checkpoint {src}")
    with torch.device("meta"):  # only the names and shapes of the model are needed
        model = GCViT(**infer_config(raw))
    native = fit_state_dict(obj, model, f"checkpoint {src}")
    out = from_native(native, to)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in out.items()}, str(dst))
    else:  # the official release files wrap their weights this way
        torch.save({"state_dict": out} if to == "official" else out, dst)
    return f"{src} ({fmt}, {describe(raw)}) -> {dst} ({to}, {len(out)} tensors)"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(prog="python -m gcvit.convert", description=__doc__)
    p.add_argument("src", type=Path, help="checkpoint to read (.pth/.pt/.safetensors; any of the formats)")
    p.add_argument("dst", type=Path, help="file to write (.safetensors or anything else for torch.save)")
    p.add_argument("--to", choices=FORMATS, default="native", help="key layout to write (default native)")
    args = p.parse_args(argv)
    try:
        print(convert(args.src, args.dst, args.to))
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
