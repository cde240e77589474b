"""Per-sample augmentation parameters, drawn in Python from each sample's own generator (all loaders)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from gcvit_data.index import DataError

LEVEL_DENOM = 10.0  # timm's magnitude scale: m=10 is the full range of every op


def rrc_params(rng: np.random.Generator, width: int, height: int, scale: tuple[float, float],
               ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: (top, left, height, width) of the crop in pixels."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop at the nearest allowed aspect ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def val_geometry(width: int, height: int, img_size: int, crop_pct: float) -> tuple[int, int, int, int]:
    """timm eval transform geometry: resized (width, height) with the shorter side floor(img_size/crop_pct),
    then the (top, left) of the centered img_size crop, rounded as torchvision does."""
    short = math.floor(img_size / crop_pct)
    if width <= height:
        rw, rh = short, int(short * height / width)
    else:
        rw, rh = int(short * width / height), short
    return rw, rh, int(round((rh - img_size) / 2.0)), int(round((rw - img_size) / 2.0))


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed timm RandAugment string such as rand-m9-mstd0.5-inc1."""

    magnitude: float = 10.0  # mean magnitude on timm's 0..10 scale
    num_layers: int = 2  # ops drawn per image
    prob: float = 0.5  # probability of applying each drawn op
    magnitude_std: float = 0.0  # gaussian noise on the magnitude per op (inf: uniform in 0..magnitude)
    magnitude_max: float = LEVEL_DENOM  # magnitudes are clipped to [0, magnitude_max]
    increasing: bool = False  # the 'inc' op set, whose strength grows with magnitude

    @classmethod
    def parse(cls, spec: str) -> RandAugmentSpec:
        """Parse timm's syntax (m, n, p, mstd, mmax, inc); unknown sections are an error, as in timm."""
        parts = spec.split("-")
        if parts[0] != "rand":
            raise DataError(f"aug.rand_augment={spec!r} must start with 'rand-' (timm RandAugment syntax, "
                            "e.g. rand-m9-mstd0.5-inc1)")
        kw: dict[str, float | int | bool] = {}
        keys = {"m": ("magnitude", float), "n": ("num_layers", int), "p": ("prob", float),
                "mstd": ("magnitude_std", float), "mmax": ("magnitude_max", float),
                "inc": ("increasing", int)}
        for part in parts[1:]:
            match = re.fullmatch(r"([a-z]+)(\d.*)", part)
            if not match or match[1] not in keys:
                raise DataError(f"aug.rand_augment={spec!r}: unknown section {part!r}; supported: m, n, p, "
                                "mstd, mmax, inc")
            name, kind = keys[match[1]]
            kw[name] = kind(match[2]) if name != "increasing" else bool(int(match[2]))
        if kw.get("magnitude_std", 0) > 100:
            kw["magnitude_std"] = math.inf
        return cls(**kw)

    def sample_magnitude(self, rng: np.random.Generator) -> float:
        """One op's magnitude, as timm's AugmentOp draws it."""
        m = self.magnitude
        if self.magnitude_std == math.inf:
            m = rng.uniform(0, m)
        elif self.magnitude_std > 0:
            m = rng.normal(m, self.magnitude_std)
        return float(min(max(m, 0.0), self.magnitude_max))
