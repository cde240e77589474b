"""What the data benchmarks share: the dataset root they read, an endless train stream, the default recipe."""
from __future__ import annotations

from pathlib import Path
from typing import Any

FULL = "rand-m9-mstd0.5-inc1"  # the in1k recipe's RandAugment


def dataset_root(root: Path, tmp: Path) -> Path:
    """ROOT itself, or a temporary ROOT whose train/ and val/ link to a bare folder of class folders."""
    if (root / "train").is_dir() or (root / "pack.json").is_file():
        return root
    tmp.mkdir(exist_ok=True)
    for split in ("train", "val"):
        (tmp / split).symlink_to(root.resolve())
    return tmp


class Endless:
    """Batches of a train loader across epoch ends."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.epoch = loader, 0
        self.it = self._restart()

    def _restart(self) -> Any:
        self.loader.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)

    def next(self) -> Any:
        try:
            return next(self.it)
        except StopIteration:
            self.it = self._restart()
            return next(self.it)
