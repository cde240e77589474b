"""What the DALI pipelines read: per-batch inputs computed from (seed, epoch, index) and the file alone.

The feeder is the external source's callable. It holds no position of its own: DALI hands it
(iteration, epoch_idx) as a BatchInfo, the pass plan says where that DALI epoch (one pass of the loader)
starts in the sampler's order, and the sampler maps (training epoch, start, iteration) to the global sample
indices. So the same object runs inline on the training thread (data.feeder_workers=0) or in DALI's worker
processes (spawned: no CUDA context is inherited), with identical batches either way.

Deliberately torch-free: every worker process imports this module to unpickle the feeder.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from data import dali_augment
from data.augment import RandAugmentSpec, rrc_params, val_geometry
from data.config import AugConfig
from data.image_header import image_size
from data.index import BadImage, DataError, Index
from data.sampler import GlobalSampler, sample_rng

TRAIN_INPUTS = ("encoded", "anchor", "shape", "flip", "ids", "labels", "ra_ops", "ra_bins", "ra_signs")
VAL_INPUTS = ("encoded", "geometry", "ids", "labels")


class PassPlan:
    """Where each DALI epoch of a pipeline starts: row e holds (training epoch, position, batches).

    The loader appends a row before DALI asks for the first batch of that epoch, so a worker reading row e
    always finds it complete; a row changes afterwards only to end its pass early (batches = 0). It is a
    small file rather than shared memory because a spawned worker can open a path but not inherit a lock
    or a shared array through DALI's pickled callable.
    """

    ROW = np.dtype([("epoch", "<i8"), ("position", "<i8"), ("batches", "<i8")])

    def __init__(self) -> None:
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # RAM-backed where there is one
        fd, self.path = tempfile.mkstemp(prefix="gcvit-feeder-", suffix=".plan", dir=shm)
        os.close(fd)

    def clear(self) -> None:
        """Forget every row: a new pipeline counts its epochs from 0 again."""
        os.truncate(self.path, 0)

    def append(self, epoch: int, position: int, batches: int) -> int:
        """Add the next DALI epoch's pass; returns its row (= DALI's epoch_idx)."""
        with open(self.path, "ab") as f:
            f.write(np.array([(epoch, position, batches)], self.ROW).tobytes())
            return f.tell() // self.ROW.itemsize - 1

    def end(self, row: int) -> None:
        """End a pass early: its remaining iterations report the end of the epoch to DALI."""
        with open(self.path, "r+b") as f:
            f.seek(row * self.ROW.itemsize + self.ROW.fields["batches"][1])
            f.write(np.int64(0).tobytes())

    def read(self, row: int) -> tuple[int, int, int]:
        """(training epoch, position, batches) of DALI epoch `row`."""
        with open(self.path, "rb") as f:
            f.seek(row * self.ROW.itemsize)
            rec = np.frombuffer(f.read(self.ROW.itemsize), self.ROW)[0]
        return int(rec["epoch"]), int(rec["position"]), int(rec["batches"])

    def remove(self) -> None:
        """Delete the file (the loader is gone)."""
        if os.path.exists(self.path):
            os.unlink(self.path)


class Feeder:
    """The external source callable: batch `iteration` of DALI epoch `epoch_idx`, as whole-batch arrays.

    Small per-sample inputs leave as one stacked array each (one DALI tensor list, not one tensor per
    sample: fewer objects for the training thread to hand to DALI); the encoded files as a list.
    """

    def __init__(self, index: Index, sampler: GlobalSampler, aug: AugConfig | None, img_size: int,
                 crop_pct: float, seed: int, plan: PassPlan) -> None:
        self.index, self.sampler, self.aug, self.plan = index, sampler, aug, plan
        self.img_size, self.crop_pct, self.seed = img_size, crop_pct, seed
        self.spec = RandAugmentSpec.parse(aug.rand_augment) if aug and aug.rand_augment else None

    def ids(self, pass_row: int, iteration: int) -> np.ndarray | None:
        """Global sample indices of batch `iteration` of a planned pass (None past its end)."""
        epoch, position, batches = self.plan.read(pass_row)
        return self.sampler.batch(epoch, position, iteration) if iteration < batches else None

    def __call__(self, info: Any) -> tuple[Any, ...]:
        epoch = self.plan.read(info.epoch_idx)[0]
        ids = self.ids(info.epoch_idx, info.iteration)
        if ids is None:
            raise StopIteration  # also for the iterations DALI's workers prefetch past the end
        try:
            samples = [self.train_sample(epoch, int(i)) if self.aug else self.val_sample(int(i)) for i in ids]
        except DataError as e:  # SystemExit would kill a worker process: travel as an Exception instead
            raise BadImage(str(e).removeprefix("data error: ")) from None
        encoded, *small = zip(*samples)
        return (list(encoded), *(np.stack(col) for col in small))

    def _read(self, i: int) -> tuple[np.ndarray, int, int]:
        path = self.index.path(i)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise BadImage(f"cannot read {path} ({e.strerror}); run python -m data.verify on the dataset "
                           "root") from None
        return (np.frombuffer(raw, np.uint8), *image_size(raw, path))  # a view: DALI copies it once

    def _tail(self, i: int) -> list[np.ndarray]:
        return [np.array([i], np.int64), np.array([self.index.labels[i]], np.int64)]

    def train_sample(self, epoch: int, i: int) -> list[np.ndarray]:
        """encoded, crop anchor/shape (y, x), flip, id, label, RandAugment ops/bins/signs."""
        encoded, w, h = self._read(i)
        rng = sample_rng(self.seed, epoch, i)
        top, left, ch, cw = rrc_params(rng, w, h, tuple(self.aug.scale), tuple(self.aug.ratio))
        flip = np.array(rng.random() < self.aug.hflip, np.int32)
        ra = dali_augment.draw(self.spec, rng) if self.spec else ()
        return [encoded, np.array([top, left], np.int32), np.array([ch, cw], np.int32), flip,
                *self._tail(i), *ra]

    def val_sample(self, i: int) -> list[np.ndarray]:
        """encoded, (height, width) of the resized image and (top, left) of the crop in it, id, label."""
        encoded, w, h = self._read(i)
        rw, rh, top, left = val_geometry(w, h, self.img_size, self.crop_pct)
        return [encoded, np.array([rh, rw, top, left], np.int32), *self._tail(i)]
