"""The `torch` fallback loader: PIL decode, torchvision crop/flip, timm RandAugment, a DataLoader."""
from __future__ import annotations

import io
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import LEVEL_TO_ARG, rand_augment_transform
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from gcvit_data.augment import RandAugmentSpec, rrc_params, val_geometry
from gcvit_data.config import IMAGENET_MEAN, AugConfig, DataConfig, checked_interpolation
from gcvit_data.index import BadImage, Index, bad_image
from gcvit_data.sampler import GlobalSampler, sample_rng

_PIL = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
        "nearest": Image.Resampling.NEAREST}


def _posterize_increasing_bits(level: float, hparams: dict) -> tuple[int]:
    """timm's 'PosterizeIncreasing' level with bits clamped to >= 1 (Pillow >= 13 refuses 0 bits).

    timm gives 4 - int(4 * level / 10) bits, 0 at level 10; older Pillow turned 0 bits into a black image.
    Clamping only changes draws with magnitude >= 10 (2.3% of posterize draws at m9 mstd0.5) into 1 bit.
    """
    return (max(1, 4 - int(level / 10 * 4)),)


def timm_rand_augment(spec: str, img_size: int, interpolation: str) -> Any:
    """timm's PIL RandAugment as timm's create_transform builds it, made safe for Pillow 13."""
    hparams = {"translate_const": int(img_size * 0.45), "interpolation": _PIL[interpolation],
               "img_mean": tuple(round(255 * m) for m in IMAGENET_MEAN)}
    ra = rand_augment_transform(spec, hparams)
    for op in ra.ops:
        if op.level_fn is LEVEL_TO_ARG["PosterizeIncreasing"]:
            op.level_fn = _posterize_increasing_bits
    return ra


class ImageDataset(Dataset):
    """Index entries keyed by (epoch, sample index): the augmentation depends on nothing else."""

    def __init__(self, index: Index, aug: AugConfig | None, img_size: int, crop_pct: float, seed: int,
                 interpolation: str) -> None:
        self.index, self.aug, self.img_size, self.crop_pct, self.seed = index, aug, img_size, crop_pct, seed
        self.interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                       "nearest": InterpolationMode.NEAREST}[checked_interpolation(interpolation)]
        self.rand_augment = (timm_rand_augment(aug.rand_augment, img_size, interpolation)
                             if aug is not None and aug.rand_augment else None)
        if aug is not None and aug.rand_augment:
            RandAugmentSpec.parse(aug.rand_augment)  # our one-line error for a bad string

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        epoch, i = key
        encoded = self.index.encoded(i)
        try:
            with Image.open(io.BytesIO(encoded)) as f:
                img = f.convert("RGB")
        except (OSError, ValueError) as e:
            raise BadImage(bad_image(self.index.path(i), e)) from None
        if self.aug is None:
            rw, rh, _, _ = val_geometry(img.width, img.height, self.img_size, self.crop_pct)
            img = TF.center_crop(TF.resize(img, [rh, rw], self.interp), [self.img_size] * 2)
        else:
            rng = sample_rng(self.seed, epoch, i)
            scale, ratio = tuple(self.aug.scale), tuple(self.aug.ratio)
            top, left, h, w = rrc_params(rng, img.width, img.height, scale, ratio)
            img = TF.resized_crop(img, top, left, h, w, [self.img_size] * 2, self.interp)
            if rng.random() < self.aug.hflip:
                img = TF.hflip(img)
            if self.rand_augment is not None:
                img = self._rand_augment(img, int(rng.integers(2**32)))
        arr = np.asarray(img, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), self.index.labels[i], i

    def _rand_augment(self, img: Image.Image, seed: int) -> Image.Image:
        """timm draws from the global `random` and numpy generators: seed them per sample, then restore."""
        saved = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.rand_augment(img)
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])


class _Batches:
    """Batch sampler of (epoch, index) keys, frozen at the moment an epoch's iteration starts."""

    def __init__(self, sampler: GlobalSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch
        for ids in self.sampler.batches():
            yield [(epoch, int(i)) for i in ids]

    def __len__(self) -> int:
        return len(self.sampler)


def torch_batches(index: Index, data: DataConfig, aug: AugConfig | None, sampler: GlobalSampler,
                  img_size: int, seed: int) -> DataLoader:
    """A DataLoader yielding (uint8 NCHW images, labels, ids) for the sampler's batches."""
    ds = ImageDataset(index, aug, img_size, data.crop_pct, seed, data.interpolation)
    workers = max(0, data.workers)
    return DataLoader(ds, batch_sampler=_Batches(sampler), num_workers=workers,
                      prefetch_factor=data.prefetch if workers else None, persistent_workers=workers > 0,
                      pin_memory=torch.cuda.is_available())
