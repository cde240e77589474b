"""Render a run's curves from RUN_DIR/metrics.jsonl to a PNG: `python -m gcvit.plot RUN_DIR [-o out.png]`.

For clusters without W&B access: loss, lr, top-1/top-5 (model and EMA) and throughput in one figure.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: cluster login nodes have no display
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, eval records) of RUN_DIR/metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist; pass the run directory that train.py printed")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind") == "train"], [r for r in records if r.get("kind") == "eval"]


def plot(run_dir: Path, out: Path | None = None) -> Path:
    """Draw the four panels and return the PNG's path (default RUN_DIR/curves.png)."""
    train, evals = read_metrics(run_dir)
    if not train and not evals:
        raise SystemExit(f"{run_dir / 'metrics.jsonl'} holds no train or eval records yet")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    steps = [r["step"] for r in train]
    panels = [(axes[0, 0], "loss", "train loss"), (axes[0, 1], "lr", "learning rate"),
              (axes[1, 1], "img_per_s", "images / s (global)")]
    for ax, key, title in panels:
        ax.plot(steps, [r[key] for r in train], lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax = axes[1, 0]
    for key, style in (("top1", "-o"), ("top5", "-s"), ("ema_top1", "--o"), ("ema_top5", "--s")):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            ax.plot(*zip(*pts), style, ms=3, label=key.replace("_", " "))
    ax.set_title("validation accuracy (%)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if evals:
        ax.legend()
    fig.suptitle(run_dir.resolve().name)
    fig.tight_layout()
    out = out or run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m gcvit.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run directory holding metrics.jsonl")
    parser.add_argument("-o", "--out", type=Path, default=None, help="PNG path (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    print(plot(args.run_dir, args.out))


if __name__ == "__main__":
    main()
