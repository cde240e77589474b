"""build_loader: the one entry point of the trainer into the input pipeline (dali | torch | synthetic).

The loaders' shared base (the Batch they yield, sampler bookkeeping, audit) is gcvit_data.loader_base, which
the DALI loader (gcvit_data.dali, imported here only when chosen: DALI is an optional extra) builds on too.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch

from gcvit_data.config import DALI_DEVICES, IMAGENET_MEAN, IMAGENET_STD, LOADERS, AugConfig, DataConfig
from gcvit_data.index import BadImage, DataError, Index
from gcvit_data.loader_base import Batch, Loader, labels_on
from gcvit_data.sampler import GlobalSampler
from gcvit_data.split import split_index
from gcvit_data.torch_loader import torch_batches

SYNTHETIC_VAL_SAMPLES = 50000


def image_dtype(precision: str) -> torch.dtype:
    """What the images leave the loader as: half precision for bf16/fp16 steps (DALI has no bfloat16; the
    model's first convolution converts under autocast, as it would convert float32), float32 otherwise."""
    return torch.float16 if precision in ("bf16", "fp16") else torch.float32


@functools.cache
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std in uint8 units on `device`, made once (each new copy would wait for a GPU)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return mean.to(device), std.to(device)


def normalize_on(images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 NCHW (any device) to ImageNet-normalized `dtype` on `device`, channels_last."""
    x = images.to(device, non_blocking=True).float().contiguous(memory_format=torch.channels_last)
    mean, std = _mean_std(device)
    return ((x - mean) / std).to(dtype)


class SyntheticLoader(Loader):
    """Fixed random images already on the device: measures the model and the loop without input costs."""

    def __init__(self, sampler: GlobalSampler, num_classes: int, img_size: int, seed: int,
                 device: torch.device, dtype: torch.dtype, split: str, audit_dir: str | None) -> None:
        super().__init__(sampler, num_classes, split, audit_dir)
        g = torch.Generator(device="cpu").manual_seed(seed)
        images = torch.randn(sampler.batch_size, 3, img_size, img_size, generator=g)
        self.images = images.to(device, dtype).contiguous(memory_format=torch.channels_last)
        self.device = device

    def _produce(self) -> Iterator[Batch]:
        for ids in self.sampler.batches():
            ids_t = torch.from_numpy(ids).long()
            yield Batch(self.images[:len(ids_t)], labels_on(ids_t % self.num_classes, self.device), ids_t)


class TorchLoader(Loader):
    """PIL/torchvision/timm transforms in DataLoader workers; normalization on the device."""

    def __init__(self, sampler: GlobalSampler, batches: Any, num_classes: int, device: torch.device,
                 dtype: torch.dtype, split: str, audit_dir: str | None) -> None:
        super().__init__(sampler, num_classes, split, audit_dir)
        self.batches, self.device, self.dtype = batches, device, dtype

    def _produce(self) -> Iterator[Batch]:
        try:
            for images, labels, ids in self.batches:
                yield Batch(normalize_on(images, self.device, self.dtype), labels_on(labels, self.device),
                            ids.long())
        except BadImage as e:  # re-raised by the DataLoader with the worker's traceback around our line
            raise DataError(str(e).rsplit("BadImage: ", 1)[-1].strip()) from None


def build_loader(data: DataConfig, aug: AugConfig, *, split: str, img_size: int, seed: int, rank: int,
                 world_size: int, device: torch.device, audit_dir: str | None = None,
                 precision: str = "fp32", index: Index | None = None) -> Loader:
    """The loader of one split for this rank (see gcvit_data.sampler for the sharding and resume guarantees);
    `precision` is the step's (trainer.precision): it sets the images' dtype (image_dtype). `index` (an
    eval set's images, gcvit_data.eval_sets) is read with the val transform instead of data.root's split.
    `audit_dir`: each rank appends the ids it hands out there (gcvit_data.loader_base; None: no audit)."""
    if data.loader not in LOADERS:
        raise DataError(f"data.loader={data.loader!r} is not one of {', '.join(LOADERS)}")
    if split not in ("train", "val"):
        raise DataError(f"split={split!r} must be train or val")
    train = split == "train"
    device, dtype = torch.device(device), image_dtype(precision)
    if data.loader == "synthetic" and index is None:
        n = data.synthetic_samples if train else SYNTHETIC_VAL_SAMPLES
        sampler = GlobalSampler(n, batch_size=data.batch_size, rank=rank, world_size=world_size, seed=seed,
                                train=train)
        return SyntheticLoader(sampler, data.synthetic_classes, img_size, seed, device, dtype, split,
                               audit_dir)
    record = None
    if index is not None:
        if train:
            raise DataError("an eval set's index is read with the val transform only (split='val')")
    elif not data.root and not data.train_list:
        raise DataError("data.root is not set; pass data.root=/path/to/imagenet (ROOT/train/<wnid>/*.JPEG, "
                        "ROOT/val/<wnid>/*.JPEG) or use data=demo")
    else:
        index, record = split_index(data, train)
    sampler = GlobalSampler(len(index), batch_size=data.batch_size, rank=rank, world_size=world_size,
                            seed=seed, train=train)
    if data.loader in ("torch", "synthetic"):  # synthetic runs given real images: the torch reader
        batches = torch_batches(index, data, aug if train else None, sampler, img_size, seed)
        loader: Loader = TorchLoader(sampler, batches, len(index.classes), device, dtype, split, audit_dir)
    else:
        if data.dali_device not in DALI_DEVICES:
            raise DataError(f"data.dali_device={data.dali_device!r} is not one of {', '.join(DALI_DEVICES)}")
        from gcvit_data.dali import DaliLoader

        loader = DaliLoader(index, data, aug if train else None, sampler, img_size=img_size, seed=seed,
                            device=device, dtype=dtype, split=split, audit_dir=audit_dir)
    loader.classes, loader.split_record, loader.index = index.classes, record, index
    return loader
