"""timm's RandAugment ('rand-...-inc1' op set and level functions) built from DALI auto_aug operations.

Which ops a sample gets, whether each is applied, and its magnitude and sign are drawn in Python from the
sample's own generator (augment.py) and enter the pipeline as per-sample inputs, so the result depends on
the sample alone. Magnitudes are quantized to 0.1 on timm's 0..10 scale (NUM_BINS bins).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations as a
from nvidia.dali.auto_aug.core import augmentation, select, signed_bin
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import do_not_convert

from gcvit_data.augment import LEVEL_DENOM, RandAugmentSpec
from gcvit_data.config import IMAGENET_MEAN

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


@augmentation(param_device="auto")
def _solarize(data: DataNode, threshold: DataNode) -> DataNode:
    """PIL solarize: invert pixels >= threshold (as one xor, half the cost of DALI's mask arithmetic)."""
    return data ^ ((data >= threshold) * types.Constant(255, dtype=types.UINT8))


@augmentation(param_device="auto", mag_to_param=lambda m: np.uint8(m))
def _solarize_add(data: DataNode, shift: DataNode) -> DataNode:
    """timm solarize_add: add `shift` to pixels below 128 (at most 127 + 110: no overflow)."""
    return data + (data < types.Constant(128, dtype=types.UINT8)) * shift


@augmentation
def _color(data: DataNode, factor: DataNode) -> DataNode:
    """PIL ImageEnhance.Color: blend with the image's luma (ITU-R 601), 3x cheaper than fn.saturation."""
    gray = fn.cast(fn.color_space_conversion(data, image_type=types.RGB, output_type=types.GRAY),
                   dtype=types.FLOAT)
    return fn.cast_like(dmath.clamp(gray + (fn.cast(data, dtype=types.FLOAT) - gray) * factor, 0, 255), data)


def _rotate_matrix(img_size: int) -> Callable[[float], np.ndarray]:
    """PIL Image.rotate(deg) as a dst->src matrix: about the centre, counter-clockwise for deg > 0."""
    def matrix(deg: float) -> np.ndarray:
        a, c = -np.deg2rad(float(deg)), img_size / 2
        m = np.array([[np.cos(a), np.sin(a), 0], [-np.sin(a), np.cos(a), 0], [0, 0, 1]], np.float32)
        m[:2, 2] = [c - m[0, 0] * c - m[0, 1] * c, c - m[1, 0] * c - m[1, 1] * c]
        return m
    return matrix


def _shear_matrix(axis: int) -> Callable[[float], np.ndarray]:
    """timm's shear: PIL AFFINE (1, s, 0, 0, 1, 0) for x, (1, 0, 0, s, 1, 0) for y, as a dst->src matrix."""
    def matrix(s: float) -> np.ndarray:
        m = np.eye(3, dtype=np.float32)
        m[axis, 1 - axis] = s
        return m
    return matrix


def _warp(name: str, mags: np.ndarray, to_matrix: Callable[[float], np.ndarray],
          fill: list[int]) -> a._Augmentation:
    """An affine op as PIL does it (bicubic, dst->src, pixel corners at integers, timm's fill colour):
    DALI's warp_perspective, which on the CPU is 2.5x faster bicubic than warp_affine is bilinear."""
    def warp(data: DataNode, matrix: DataNode) -> DataNode:
        return fn.experimental.warp_perspective(data, matrix, fill_value=fill, interp_type=types.INTERP_CUBIC,
                                                inverse_map=True, pixel_origin="corner")

    return augmentation(warp, mag_range=mags, randomly_negate=True, mag_to_param=to_matrix,
                        param_device="auto", name=name)


def _translate(axis: int, img_size: int, fill: list[int]) -> a._Augmentation:
    """timm TranslateXRel/YRel as a padded slice, offsets rounded to whole pixels (a warp costs 15x more)."""
    def offset(m: float) -> np.ndarray:
        out = np.zeros(2, np.int32)  # (y, x) anchor of the output window in the input
        out[axis] = int(round(float(m)))
        return out

    def translate(data: DataNode, anchor: DataNode) -> DataNode:
        return fn.slice(data, anchor, types.Constant(np.array([img_size, img_size], np.int32)),
                        axis_names="HW", out_of_bounds_policy="pad", fill_values=fill)

    mags = np.asarray(0.45 * img_size * _FRAC, np.float32)
    return augmentation(translate, mag_range=mags, randomly_negate=True, mag_to_param=offset,
                        name=f"translate_{'yx'[axis]}")


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
    solarize = np.minimum(256, np.floor(256 * _FRAC))  # threshold: pixels at or above it are inverted
    fill = [round(255 * m) for m in IMAGENET_MEAN]  # timm fills with the mean colour
    return {
        "AutoContrast": a.auto_contrast,
        "Equalize": _equalize,
        "Invert": a.invert,
        "Rotate": _warp("rotate", mags(30 * _FRAC), _rotate_matrix(img_size), fill),
        "Posterize": a.posterize.augmentation(mag_range=mags(np.maximum(posterize_bits, 1))),
        "Solarize": _solarize.augmentation(mag_range=mags(256 - solarize if increasing else solarize)),
        "SolarizeAdd": _solarize_add.augmentation(mag_range=mags(np.floor(110 * _FRAC))),
        "Color": _color.augmentation(mag_range=enhance, **enhance_kw),
        "Contrast": a.contrast.augmentation(mag_range=enhance, **enhance_kw),
        "Brightness": a.brightness.augmentation(mag_range=enhance, **enhance_kw),
        "Sharpness": _sharpness.augmentation(mag_range=enhance, **sharp_kw),
        "ShearX": _warp("shear_x", mags(0.3 * _FRAC), _shear_matrix(0), fill),
        "ShearY": _warp("shear_y", mags(0.3 * _FRAC), _shear_matrix(1), fill),
        "TranslateXRel": _translate(1, img_size, fill),
        "TranslateYRel": _translate(0, img_size, fill),
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
    for layer in range(spec.num_layers):
        images = select(chosen, ops[layer], data=images, magnitude_bin=signed_bin(bins[layer], signs[layer]),
                        num_magnitude_bins=NUM_BINS)
    return images
