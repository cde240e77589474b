"""One whole epoch of a loader, read the way the shard-format tests compare it with the folder's: the same
recipe and seed, optionally restarted from a saved position; and the bitwise comparison of two epochs."""
from __future__ import annotations

from pathlib import Path

import torch

from gcvit_data.config import AugConfig, DataConfig
from gcvit_data.loaders import build_loader


def epoch_batches(root: Path, split: str, workers: int, resume_after: int | None = None,
                  val_split: float | None = None, loader: str = "torch") -> list[tuple]:
    """A whole epoch; workers: DataLoader workers (torch) or feeder processes (dali, on 1 DALI thread)."""
    procs = {"workers": workers} if loader == "torch" else {"workers": 1, "feeder_workers": workers}
    data = DataConfig(root=str(root), loader=loader, batch_size=5, val_split=val_split, **procs)

    def build():
        return build_loader(data, AugConfig(rand_augment="rand-m9-mstd0.5-inc1"), split=split, img_size=24,
                            seed=3, rank=0, world_size=1, device=torch.device("cpu"))
    loader_ = build()
    loader_.set_epoch(1)
    out = []
    for batch in loader_:
        out.append((batch.images, batch.labels, batch.ids))
        if resume_after is not None and len(out) == resume_after:  # a restart from the saved position
            state = loader_.state_dict()
            loader_ = build()
            loader_.load_state_dict(state)
            out += [(b.images, b.labels, b.ids) for b in loader_]
            break
    return out


def assert_same(got: list[tuple], want: list[tuple]) -> None:
    assert len(got) == len(want)
    for (x, y, i), (fx, fy, fi) in zip(got, want):
        assert torch.equal(i, fi) and torch.equal(y, fy) and torch.equal(x, fx)
