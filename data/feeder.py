"""What the DALI pipelines read: per-batch inputs computed from (seed, epoch, index) and the file alone.

The feeder is the external source's callable. It holds no position of its own: DALI hands it
(iteration, epoch_idx) as a BatchInfo, the pass plan says where that DALI epoch (one pass of the loader)
starts in the sampler's order, and the sampler maps (training epoch, start, iteration) to the global sample
indices. So the same object runs inline on the training thread (data.feeder_workers=0) or in DALI's worker
processes (spawned: no CUDA context is inherited), with identical batches either way.

Deliberately torch-free: every worker process imports this module to unpickle the feeder.
"""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from typing import Any

import numpy as np

from gcvit_data import dali_augment
from gcvit_data.augment import RandAugmentSpec, rrc_params, val_geometry
from gcvit_data.config import AugConfig
from gcvit_data.image_header import image_size, jpeg_size
from gcvit_data.index import BadImage, DataError, Index
from gcvit_data.sampler import GlobalSampler, sample_rng

# The feeder's outputs per batch: paths (zero-padded bytes; from shards: the encoded images, one uint8 array
# each), params (int32 per sample), keys (int64: id, label). Train params hold TRAIN_PARAMS then, with
# RandAugment, the op ids, magnitude bins and signs of each layer; val params the resized height and width,
# then the crop's top and left.
INPUTS = ("paths", "params", "keys")
TRAIN_PARAMS = ("top", "left", "height", "width", "flip")
HEAD_BYTES = 16384  # enough for the start-of-frame of nearly every JPEG; the rest is read only when not


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

    Each output leaves as one stacked array (one DALI tensor list, not one tensor per sample), so what the
    training thread hands to DALI per batch is a few small arrays whatever the batch size: the files'
    paths (zero-padded bytes; DALI's fn.io.file.read reads the files on its own threads) and the drawn
    parameters. The feeder itself reads only each file's header, for the size the crop is drawn from.

    From a reader of shards (a pack, WebDataset tars: index.by_path is False) there is no file to name: the
    reader gives each sample's bytes, one pread from its shard (the shards are opened once per process, at
    the first read), and the feeder hands DALI the encoded images themselves, a list of arrays.
    """

    def __init__(self, index: Index, sampler: GlobalSampler, aug: AugConfig | None, img_size: int,
                 crop_pct: float, seed: int, plan: PassPlan) -> None:
        self.index, self.sampler, self.aug, self.plan = index, sampler, aug, plan
        self.img_size, self.crop_pct, self.seed = img_size, crop_pct, seed
        self.spec = RandAugmentSpec.parse(aug.rand_augment) if aug and aug.rand_augment else None
        self.from_bytes = not index.by_path  # DALI gets the encoded images, not paths to read

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled only in DALI's worker processes. A preemption signal (SLURM's USR1 or TERM to every
        # process of the job, a Ctrl-C to the process group) is the training process's to act on: it
        # saves, then ends this pool. A worker the signal killed would leave the pipeline waiting forever.
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the worker's main thread: nothing to change
                signal.signal(sig, signal.SIG_IGN)
        self.__dict__.update(state)

    def ids(self, pass_row: int, iteration: int) -> tuple[int, np.ndarray | None]:
        """A planned pass's training epoch and the global sample indices of its batch `iteration` (None past
        the pass's end)."""
        epoch, position, batches = self.plan.read(pass_row)
        return epoch, self.sampler.batch(epoch, position, iteration) if iteration < batches else None

    def __call__(self, info: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        epoch, ids = self.ids(info.epoch_idx, info.iteration)
        if ids is None:
            raise StopIteration  # also for the iterations DALI's workers prefetch past the end
        try:
            samples = [self.train_sample(epoch, int(i)) if self.aug else self.val_sample(int(i)) for i in ids]
        except DataError as e:  # SystemExit would kill a worker process: travel as an Exception instead
            raise BadImage(str(e).removeprefix("data error: ")) from None
        paths, params = zip(*samples)
        keys = np.stack([ids, np.asarray(self.index.labels)[ids]], axis=1).astype(np.int64)
        if self.from_bytes:
            return list(paths), np.stack(params), keys
        padded = np.zeros((len(paths), max(map(len, paths))), np.uint8)  # DALI stops at the first NUL
        for row, path in zip(padded, paths):
            row[:len(path)] = np.frombuffer(path, np.uint8)
        return padded, np.stack(params), keys

    def _read(self, i: int) -> tuple[Any, int, int]:
        """The file's path as bytes (from shards: the encoded image) and its (width, height) from the
        header."""
        path, _, _ = self.index.sample(i)
        if self.from_bytes:  # `path` holds the encoded image
            size = jpeg_size(path[:HEAD_BYTES]) or image_size(path, self.index.path(i))
            return (np.frombuffer(path, np.uint8), *size)
        try:
            with open(path, "rb") as f:
                head = f.read(HEAD_BYTES)
                size = jpeg_size(head)
                if size is None:  # not a JPEG, or a header longer than HEAD_BYTES
                    size = image_size(head + f.read(), path)
        except OSError as e:
            raise BadImage(f"cannot read {path} ({e.strerror}); run python -m gcvit_data.verify on the "
                           "dataset root") from None
        return (os.fsencode(path), *size)

    def train_sample(self, epoch: int, i: int) -> tuple[Any, np.ndarray]:
        """path (or encoded image), TRAIN_PARAMS: crop (top, left, height, width), flip, RandAugment ops,
        bins, signs."""
        path, w, h = self._read(i)
        rng = sample_rng(self.seed, epoch, i)
        crop = rrc_params(rng, w, h, tuple(self.aug.scale), tuple(self.aug.ratio))
        flip = int(rng.random() < self.aug.hflip)
        ra = dali_augment.draw(self.spec, rng) if self.spec else ()
        return path, np.concatenate([crop, [flip], *ra]).astype(np.int32)

    def val_sample(self, i: int) -> tuple[Any, np.ndarray]:
        """path (or encoded image), (height, width) of the resized image and (top, left) of the crop in it."""
        path, w, h = self._read(i)
        rw, rh, top, left = val_geometry(w, h, self.img_size, self.crop_pct)
        return path, np.array([rh, rw, top, left], np.int32)
