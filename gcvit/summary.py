"""Per-variant parameter counts and GMACs (torch.utils.flop_counter, shapes only on the meta device)."""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from gcvit.models import create_model, list_models


def measure(name: str, img_size: int = 224, num_classes: int = 1000) -> dict:
    """Params (M) and GMACs of one forward pass of a single image (1 MAC = 2 counted FLOPs)."""
    with torch.device("meta"):
        model = create_model(name, img_size=img_size, num_classes=num_classes).eval()
        x = torch.empty(1, model.stem.in_channels, img_size, img_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    params = sum(p.numel() for p in model.parameters())
    return dict(model=name, img_size=img_size, params_m=round(params / 1e6, 2),
                gmacs=round(counter.get_total_flops() / 2e9, 2), windows=list(model.window_sizes))


def main(argv: list[str] | None = None) -> int:
    """Print a table (or JSON lines) for the chosen variants."""
    p = argparse.ArgumentParser(prog="python -m gcvit.summary", description=__doc__)
    p.add_argument("models", nargs="*", default=list_models(), help="variants (default: all)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = p.parse_args(argv)
    try:
        rows = [measure(m, args.img_size) for m in args.models]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print("\n".join(json.dumps(r) for r in rows))
        return 0
    print(f"{'model':<14}{'params (M)':>12}{'GMACs @' + str(args.img_size):>14}  windows")
    for r in rows:
        print(f"{r['model']:<14}{r['params_m']:>12.2f}{r['gmacs']:>14.2f}  {tuple(r['windows'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
