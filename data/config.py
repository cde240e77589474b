"""Typed configuration of the input pipeline (embedded by the trainer as `data.*` and `aug.*`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from gcvit_data.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOADERS = ("dali", "torch", "synthetic")
DALI_DEVICES = ("cpu", "gpu")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
EVAL_SETS = ("val", "real", "v2", "a", "r", "sketch")  # what eval.sets may name (rules: gcvit_data.eval_sets)


def checked_interpolation(name: str) -> str:
    """`name` when it is a supported resize filter, else a one-line error."""
    if name not in INTERPOLATIONS:
        raise DataError(f"data.interpolation={name!r} is not one of {', '.join(INTERPOLATIONS)}")
    return name


@dataclass
class DataConfig:
    """Where the images are and how they are read."""

    root: str | None = None  # ROOT/{train,val}/<wnid>/*.JPEG, a pack, or WebDataset shards with _info.json
    demo: bool = False  # with root unset, generate and use the small demo dataset (gcvit_data.demo)
    loader: str = "dali"  # dali | torch (torchvision/timm + DataLoader) | synthetic (random tensors)
    dali_device: str = "cpu"  # cpu (CPU decode, no GPU needed) | gpu (mixed nvJPEG decode)
    batch_size: int = 128  # micro-batch per device
    workers: int = 8  # DALI CPU threads (and as many cpu-resize threads), or torch DataLoader processes
    prefetch: int = 2  # batches DALI / each DataLoader worker prepares ahead
    feeder_workers: int = 2  # dali: processes that read files and draw augmentations (0: the training thread)
    hw_decoder_load: float = 0.65  # dali gpu: share of JPEGs for the hardware JPEG decoder (A100/H100), 0-1
    crop_pct: float = 0.875  # val: resize the shorter side to img_size / crop_pct, then center crop
    interpolation: str = "bicubic"  # resize filter for train and val: bicubic | bilinear | nearest
    index_cache: str | None = None  # file list cache dir; null = ROOT/.gcvit-index (or ~/.cache if read-only)
    index_dir: str | None = None  # clean {train,val}.tsv (gcvit_data.verify); WebDataset: its index's home
    cache_dir: str | None = None  # local disk a pack or WebDataset shards (data.root) are copied to per node
    synthetic_samples: int = 1281167  # synthetic loader: samples per train epoch (val: 50000)
    synthetic_classes: int = 1000  # synthetic loader: number of classes
    val_split: float | None = None  # hold out this fraction of each class of ROOT/train as val (no ROOT/val)
    val_split_seed: int = 0  # which images data.val_split holds out
    train_list: str | None = None  # CSV/TSV of `path,label` rows instead of ROOT/train (readers/file_list.py)
    val_list: str | None = None  # likewise for val (else data.val_split of the train list)


@dataclass
class AugConfig:
    """Train-time augmentation; the loader does crop/flip/RandAugment, the trainer erasing and Mixup."""

    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random-resized-crop area range
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # random-resized-crop aspect range
    hflip: float = 0.5  # horizontal flip probability
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm-style RandAugment spec; null disables
    reprob: float = 0.25  # random erasing probability (trainer, timm RandomErasing on device)
    remode: str = "pixel"  # random erasing fill mode
    mixup: float = 0.8  # Mixup alpha; 0 disables (trainer, timm Mixup)
    cutmix: float = 1.0  # CutMix alpha; 0 disables
    mixup_prob: float = 1.0  # probability of applying Mixup or CutMix to a batch
    switch_prob: float = 0.5  # probability of CutMix instead of Mixup when both are on
    label_smoothing: float = 0.1  # label smoothing of the (mixed) targets
