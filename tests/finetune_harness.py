"""Shared by the fine-tuning tests: train.py on the tiny preset, and small ImageFolder datasets with their own
class names made of demo images."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from gcvit_data.demo import ensure_demo_dataset

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Arbitrary folder names (not wnids), each backed by one demo class: a 3-class task with its own names.
FOLDERS = {"apple pie": "00_circle", "Bolt-2": "03_cross", "zebra_stripes": "05_hstripes"}


def train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "train.py"), "debug=tiny", f"trainer.output_dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)


def make_folder_dataset(root: Path, per_class: dict[str, int], folders: dict[str, str] = FOLDERS,
                        gray: bool = False) -> Path:
    """ROOT/{train,val}/<name>/ with the first images of the demo class behind each name: links, or grayscale
    copies (`gray`: the demo's classes also differ in hue, which a grayscale task leaves to the shapes)."""
    demo = ensure_demo_dataset()
    for split, n in per_class.items():
        for name, src in folders.items():
            (root / split / name).mkdir(parents=True)
            for f in sorted((demo / split / src).iterdir())[:n]:
                if gray:
                    with Image.open(f) as img:
                        img.convert("L").convert("RGB").save(root / split / name / f.name, quality=95)
                else:
                    (root / split / name / f.name).symlink_to(f)
    return root
