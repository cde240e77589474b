"""DALI train/val pipelines (one definition for cpu and gpu decode) and the loader that feeds them.

Python reads each file and draws the sample's crop, flip and RandAugment choices from the sample's own
generator (data.sampler.sample_rng); DALI gets them as per-sample inputs of an external_source. So an
image's augmentation depends on (seed, epoch, index) only: not on the rank, the batch or a restart.
"""
from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray
from nvidia.dali.tensors import TensorListGPU
from PIL import Image

from data import dali_augment
from data.augment import RandAugmentSpec, rrc_params, val_geometry
from data.config import IMAGENET_MEAN, IMAGENET_STD, AugConfig, DataConfig, checked_interpolation
from data.dali_resize import TorchResize, resize_center_crop, to_square
from data.image_header import image_size
from data.index import DataError, Index, bad_image
from data.loaders import Batch, Loader, labels_on
from data.sampler import GlobalSampler, sample_rng

TRAIN_INPUTS = ("encoded", "anchor", "shape", "flip", "ids", "labels", "ra_ops", "ra_bins", "ra_signs")
VAL_INPUTS = ("encoded", "geometry", "ids", "labels")


def _normalize(images: Any, half: bool, mirror: Any = 0) -> Any:
    """Flip, ImageNet mean/std, uint8 -> float16/32 (one fused DALI op), kept HWC: each batch is the NHWC
    memory of the channels_last NCHW tensor the model runs on, so no layout or dtype copy follows."""
    mean, std = [255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD]
    return fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.FLOAT16 if half else types.FLOAT,
                                    output_layout="HWC", mean=mean, std=std)


@pipeline_def(enable_conditionals=True)
def train_pipeline(source: Any, decoder: str, img_size: int, interp: str, spec: RandAugmentSpec | None,
                   torch_resize: TorchResize | None, half: bool):
    """ROI decode of the drawn crop, resize, RandAugment, flip + normalize; ids and labels pass through."""
    inputs = fn.external_source(source=source, num_outputs=len(TRAIN_INPUTS) - (3 if spec is None else 0),
                                batch=True)
    encoded, anchor, shape, flip, ids, labels = inputs[:6]
    images = fn.decoders.image_slice(encoded, anchor, shape, device=decoder, output_type=types.RGB,
                                     axis_names="HW", normalized_anchor=False, normalized_shape=False,
                                     adjust_orientation=False, jpeg_fancy_upsampling=True)
    images = to_square(images, img_size, interp, torch_resize)
    if spec is not None:
        images = dali_augment.rand_augment(images, *inputs[6:], spec, img_size)
    return _normalize(images, half, flip), labels, ids


@pipeline_def
def val_pipeline(source: Any, decoder: str, img_size: int, interp: str, torch_resize: TorchResize | None,
                 half: bool):
    """Decode, timm's resize-shorter-side + center-crop, normalize."""
    encoded, geometry, ids, labels = fn.external_source(source=source, num_outputs=len(VAL_INPUTS),
                                                        batch=True)
    images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, adjust_orientation=False,
                               jpeg_fancy_upsampling=True)
    images = resize_center_crop(images, geometry, img_size, interp, torch_resize)
    return _normalize(images, half), labels, ids


class Feeder:
    """The external source: per-batch inputs computed from (seed, epoch, index) and the file alone.

    One pipeline lives as long as the loader (building one with RandAugment takes seconds), so each pass
    points the feeder at the sampler's batches for the current epoch and position.
    """

    def __init__(self, index: Index, aug: AugConfig | None, img_size: int, crop_pct: float,
                 seed: int) -> None:
        self.index, self.aug, self.img_size, self.crop_pct, self.seed = index, aug, img_size, crop_pct, seed
        self.spec = RandAugmentSpec.parse(aug.rand_augment) if aug and aug.rand_augment else None
        self.epoch, self.batches = 0, iter(())
        self.recent: deque[list[int]] = deque(maxlen=8)  # ids fed lately: suspects when DALI fails

    def start(self, sampler: GlobalSampler) -> None:
        """Feed the rest of the sampler's current epoch."""
        self.epoch, self.batches = sampler.epoch, sampler.batches()

    def stop(self) -> None:
        """End the pass early: the next call reports the end of the epoch to DALI."""
        self.batches = iter(())

    def __call__(self) -> tuple[list[np.ndarray], ...]:
        ids = next(self.batches)  # StopIteration ends DALI's epoch
        self.recent.append([int(i) for i in ids])
        samples = [self.train_sample(int(i)) if self.aug else self.val_sample(int(i)) for i in ids]
        return tuple(list(col) for col in zip(*samples))

    def _read(self, i: int) -> tuple[np.ndarray, int, int]:
        path = self.index.path(i)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise DataError(f"cannot read {path} ({e.strerror}); run python -m data.verify on the dataset "
                            "root") from None
        return (np.frombuffer(raw, np.uint8), *image_size(raw, path))  # a view: DALI copies it once

    def _tail(self, i: int) -> list[np.ndarray]:
        return [np.array([i], np.int64), np.array([self.index.labels[i]], np.int64)]

    def train_sample(self, i: int) -> list[np.ndarray]:
        """encoded, crop anchor/shape (y, x), flip, id, label, RandAugment ops/bins/signs."""
        encoded, w, h = self._read(i)
        rng = sample_rng(self.seed, self.epoch, i)
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


class DaliLoader(Loader):
    """Loader over one long-lived DALI pipeline; a pass abandoned early is drained before the next."""

    def __init__(self, index: Index, data: DataConfig, aug: AugConfig | None, sampler: GlobalSampler, *,
                 img_size: int, seed: int, device: torch.device, dtype: torch.dtype, split: str,
                 audit: bool) -> None:
        super().__init__(sampler, len(index.classes), split, audit)
        if data.dali_device == "gpu" and device.type != "cuda":
            raise DataError(f"data.dali_device=gpu needs a CUDA training device, got {device}; "
                            "use data.dali_device=cpu")
        self.index, self.data, self.aug, self.img_size, self.seed = index, data, aug, img_size, seed
        self.device, self.dtype = device, dtype
        self.feeder = Feeder(index, aug, img_size, data.crop_pct, seed)
        self._pipe: Any = None
        self._interp = checked_interpolation(data.interpolation)
        # the cpu pipelines resize on torch's kernels (data/dali_resize.py); the gpu ones use DALI's
        self._torch_resize = None if data.dali_device == "gpu" else TorchResize(self._interp, data.workers)
        self._in_pass = False  # a pass was started and not run to its end

    def _pipeline(self) -> Any:
        gpu = self.data.dali_device == "gpu"
        kw = dict(batch_size=self.data.batch_size, num_threads=max(1, self.data.workers),
                  device_id=(self.device.index or 0) if gpu else None, seed=self.seed, exec_dynamic=True,
                  prefetch_queue_depth=self.data.prefetch, source=self.feeder, img_size=self.img_size,
                  decoder="mixed" if gpu else "cpu", interp=self._interp, torch_resize=self._torch_resize,
                  half=self.dtype == torch.float16)
        pipe = val_pipeline(**kw) if self.aug is None else train_pipeline(spec=self.feeder.spec, **kw)
        pipe.build()
        return pipe

    def _drain(self) -> None:
        """Discard what the pipeline prefetched for an abandoned pass (at most prefetch batches)."""
        self.feeder.stop()
        with contextlib.suppress(StopIteration):
            while True:
                self._pipe.run()
        self._pipe.reset()
        self._in_pass = False

    def _produce(self) -> Iterator[Batch]:
        if self._pipe is None:
            self._pipe = self._pipeline()
        elif self._in_pass:
            self._drain()
        self.feeder.start(self.sampler)
        self._in_pass = True
        while True:
            try:
                images, labels, ids = self._pipe.run()
            except StopIteration:
                self._pipe.reset()
                self._in_pass = False
                return
            except RuntimeError as e:
                self._pipe, self._in_pass = None, False  # a failed pipeline is not reused
                raise self._decode_error(e) from None
            # labels are always a cpu output: labels_on copies them out of DALI's buffer safely
            yield Batch(self._to_torch(images).permute(0, 3, 1, 2),
                        labels_on(torch.from_dlpack(labels.as_tensor()).view(-1), self.device),
                        torch.from_dlpack(ids.as_tensor()).view(-1))

    def _to_torch(self, out: Any) -> torch.Tensor:
        """A DALI batch as a torch tensor on the training device.

        CPU outputs are shared, not copied (a 64-image float batch is 38 MB: copying it cost ~100 us per
        image on the feeding thread). That is safe because the dynamic executor (exec_dynamic=True, set
        above) gives every iteration its own reference-counted buffers: a batch the caller still holds is
        never overwritten by a later one (tests/test_data_loaders.py holds whole epochs to check it).
        """
        if isinstance(out, TensorListGPU):
            t = out.as_tensor()
            dst = torch.empty(t.shape(), dtype=self.dtype, device=self.device)  # only images run on GPU
            feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(self.device))
            return dst
        # A cpu pipeline has no device_id, so its buffers are pageable: a copy to CUDA has read them when
        # .to() returns, before the shared buffer can be released.
        return torch.from_dlpack(out.as_tensor()).to(self.device, non_blocking=True)

    def _decode_error(self, error: RuntimeError) -> DataError:
        """Name the file DALI could not decode (checked with PIL among the batches in flight)."""
        for ids in reversed(self.feeder.recent):
            for i in ids:
                path = self.index.path(i)
                try:
                    with Image.open(path) as img:
                        img.convert("RGB")
                except Exception as e:  # noqa: BLE001 - any failure marks the culprit
                    return DataError(bad_image(path, e))
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return DataError(f"DALI failed on one of the last {sum(map(len, self.feeder.recent))} images "
                         f"({first}); run python -m data.verify on the dataset root to find bad files")
