"""What every loader is: the Batch it yields, the Loader base (sampler bookkeeping, resumable position,
audit of the ids handed out) and the labels' copy to the device; the torch, synthetic and DALI loaders
build on it."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from gcvit_data.index import Index
from gcvit_data.sampler import GlobalSampler


class Batch(NamedTuple):
    """One micro-batch: normalized NCHW images in channels_last memory (the layout the model runs in) of
    image_dtype(precision), int64 labels on the device; int64 ids on CPU."""

    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor


class Loader:
    """Sampler bookkeeping shared by all loaders; subclasses turn index batches into Batch objects."""

    classes: list[str] | None = None  # class names (label i is classes[i]); None for synthetic data
    index: Index | None = None  # the images it reads; None for synthetic data
    split_record: dict | None = None  # what data.val_split held out (gcvit_data.split.held_out), else None

    def __init__(self, sampler: GlobalSampler, num_classes: int, split: str,
                 audit_dir: Path | str | None) -> None:
        self.sampler, self.num_classes, self.split = sampler, num_classes, split
        # each rank appends the ids it hands out to AUDIT_DIR/<split>-rank<r>.jsonl (None: no audit)
        self._audit_file = Path(audit_dir) / f"{split}-rank{sampler.rank}.jsonl" if audit_dir else None

    @property
    def num_samples(self) -> int:
        """Samples in the split (before the train tail is dropped)."""
        return self.sampler.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its first sample (its permutation depends on (seed, epoch) only)."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        """Micro-batches this rank yields in a whole epoch."""
        return len(self.sampler)

    def state_dict(self) -> dict[str, Any]:
        """Epoch and position in global samples consumed (plain types)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the exact next sample, with the same augmentation, also at another world size."""
        self.sampler.load_state_dict(state)

    def _produce(self) -> Iterable[Batch]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the epoch from the current position; the position advances per batch taken."""
        epoch = self.sampler.epoch
        for batch in self._produce():
            if self._audit_file is not None:
                self._record(epoch, batch.ids.tolist())
            self.sampler.advance()
            yield batch

    def _record(self, epoch: int, ids: list[int]) -> None:
        """Append which ids were handed out at which position (global samples before them)."""
        self._audit_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self._audit_file, "a") as f:
            f.write(json.dumps({"epoch": epoch, "position": self.sampler.position, "ids": ids}) + "\n")


def trim_audit(audit_dir: Path | str, epoch: int, position: int) -> None:
    """Drop every rank's train audit records from (epoch, position) on: a resume hands them out again."""
    for path in Path(audit_dir).glob("train-rank*.jsonl"):
        records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        kept = [r for r in records if (r["epoch"], r["position"]) < (epoch, position)]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def labels_on(labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int64 labels on `device` without waiting for it.

    Towards CUDA they go through a pinned copy torch owns: torch keeps that block until the asynchronous
    copy has read it, which it cannot do for a loader's own (e.g. DALI's recycled) buffer; a copy from
    pageable memory would wait for the GPU instead. 1 KB per batch.
    """
    labels = labels.long()
    if device.type != "cuda":
        return labels.to(device)
    return labels.pin_memory().to(device, non_blocking=True)
