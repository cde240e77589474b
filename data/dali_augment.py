"""timm's RandAugment ('rand-...-inc1' op set and level functions) built from DALI auto_aug operations.

Which ops a sample gets, whether each is applied, and its magnitude and sign are drawn in Python from the
sample's own generator (data.augment) and enter the pipeline as per-sample inputs, so the result depends on
the sample alone. Magnitudes are quantized to 0.1 on timm's 0..10 scale (NUM_BINS bins).
"""
from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.auto_aug import augmentations as a
from nvidia.dali.auto_aug.core import augmentation, select, signed_bin
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import do_not_convert

from data.augment import LEVEL_DENOM, RandAugmentSpec

NUM_BINS = 101  # magnitudes 0.0, 0.1, ..., 10.0
_FRAC = np.linspace(0.0, 1.0, NUM_BINS)  # magnitude / LEVEL_DENOM per bin
TIMM_INCREASING = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                   "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                   "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                   "TranslateYRel")
TIMM_PLAIN = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
              "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@augmentation
def _equalize(data: DataNode, _: None) -> DataNode:
    """Per-channel histogram equalization (OpenCV's formula; PIL's lookup table differs slightly)."""
    return fn.equalize(data)


@augmentation(param_device="auto")
def _sharpness(data: DataNode, kernel: DataNode) -> DataNode:
    """PIL ImageEnhance.Sharpness as a 3x3 filter (PIL leaves the 1-pixel border unfiltered)."""
    return fn.filter(data, kernel)


def _suite(img_size: int, increasing: bool) -> dict[str, a._Augmentation]:
    """timm op name -> DALI augmentation whose per-bin parameters are timm's level function values."""
    def mags(values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float32)

    enhance = mags(0.9 * _FRAC) if increasing else mags(1.8 * _FRAC + 0.1)  # 1 +/- 0.9 m, or 0.1..1.9
    enhance_kw = {"randomly_negate": True, "mag_to_param": a.shift_enhance_range} if increasing else \
        {"randomly_negate": False, "mag_to_param": None}
    sharp_kw = {"randomly_negate": True, "mag_to_param": a.sharpness_kernel} if increasing else \
        {"randomly_negate": False, "mag_to_param": a.sharpness_kernel_shifted}
    posterize_bits = 4 - np.floor(4 * _FRAC) if increasing else np.floor(4 * _FRAC)  # timm's int() of 4*m/10
    solarize = 256 - np.floor(256 * _FRAC) if increasing else 256 - np.floor(256 * _FRAC[::-1])
    return {
        "AutoContrast": a.auto_contrast,
        "Equalize": _equalize,
        "Invert": a.invert,
        "Rotate": a.rotate.augmentation(mag_range=mags(30 * _FRAC)),
        "Posterize": a.posterize.augmentation(mag_range=mags(np.maximum(posterize_bits, 1))),
        "Solarize": a.solarize.augmentation(mag_range=mags(solarize)),
        "SolarizeAdd": a.solarize_add.augmentation(mag_range=mags(np.floor(110 * _FRAC))),
        "Color": a.color.augmentation(mag_range=enhance, **enhance_kw),
        "Contrast": a.contrast.augmentation(mag_range=enhance, **enhance_kw),
        "Brightness": a.brightness.augmentation(mag_range=enhance, **enhance_kw),
        "Sharpness": _sharpness.augmentation(mag_range=enhance, **sharp_kw),
        "ShearX": a.shear_x.augmentation(mag_range=mags(0.3 * _FRAC)),
        "ShearY": a.shear_y.augmentation(mag_range=mags(0.3 * _FRAC)),
        "TranslateXRel": a.translate_x_no_shape.augmentation(mag_range=mags(0.45 * img_size * _FRAC)),
        "TranslateYRel": a.translate_y_no_shape.augmentation(mag_range=mags(0.45 * img_size * _FRAC)),
    }


def ops_for(spec: RandAugmentSpec) -> tuple[str, ...]:
    """The timm op names the spec draws from, in timm's order (the index space of the drawn op ids)."""
    return TIMM_INCREASING if spec.increasing else TIMM_PLAIN


def draw(spec: RandAugmentSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sample's (op ids, magnitude bins, signs) per layer; op id len(ops) means 'not applied'."""
    n_ops = len(ops_for(spec))
    ops, bins, signs = (np.zeros(spec.num_layers, np.int32) for _ in range(3))
    for layer in range(spec.num_layers):
        ops[layer] = rng.integers(n_ops)  # timm: uniform choice with replacement
        if rng.random() >= spec.prob:
            ops[layer] = n_ops
            continue
        bins[layer] = round(spec.sample_magnitude(rng) / LEVEL_DENOM * (NUM_BINS - 1))
        signs[layer] = rng.integers(2)
    return ops, bins, signs


def rand_augment(images: DataNode, ops: DataNode, bins: DataNode, signs: DataNode, spec: RandAugmentSpec,
                 img_size: int) -> DataNode:
    """Apply the drawn layers (uint8 HWC in, uint8 HWC out); needs enable_conditionals=True."""
    suite = _suite(img_size, spec.increasing)
    # Autograph would convert (slowly: seconds per op) the per-bin parameter tables DALI computes in Python
    # when each op is called; only select()'s `if`s need it.
    chosen = [do_not_convert(suite[name.removesuffix("Increasing")].__call__) for name in ops_for(spec)]
    chosen.append(do_not_convert(a.identity.__call__))
    fill = [round(255 * m) for m in (0.485, 0.456, 0.406)]
    for layer in range(spec.num_layers):
        images = select(chosen, ops[layer], data=images, magnitude_bin=signed_bin(bins[layer], signs[layer]),
                        num_magnitude_bins=NUM_BINS, fill_value=sum(fill) / 3,
                        interp_type=types.INTERP_LINEAR)
    return images
