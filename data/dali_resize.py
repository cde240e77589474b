"""The resize step of the DALI pipelines: DALI's own on the GPU, torch's uint8 kernels on the CPU.

On the CPU, DALI's antialiased bicubic resize of a random-resized crop to 224x224 costs ~1.5 ms, more
than decoding the crop (~1 ms, measured on the ImageNet sample). torch's vectorized uint8 kernel applies
the same filter as PIL (antialiased, cubic coefficient -0.5: timm's reference) in ~0.2 ms and releases the
GIL, so the cpu pipelines run it as a python_function over a small thread pool. On the GPU DALI's CUDA
resize is fast and the images never leave the device.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from nvidia.dali import fn, types
from nvidia.dali.pipeline import do_not_convert

DALI_INTERP = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR, "nearest": types.INTERP_NN}
TORCH_MODE = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest-exact"}  # PIL's semantics


class TorchResize:
    """Per-sample uint8 HWC resizes on `threads` threads (torch's kernels drop the GIL)."""

    def __init__(self, interp: str, threads: int) -> None:
        self.mode = TORCH_MODE[interp]
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="resize")

    def _resize(self, image: np.ndarray, height: int, width: int) -> torch.Tensor:
        """HWC uint8 -> (height, width, C) uint8; the NHWC view keeps torch on its channels-last kernel."""
        x = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
        y = F.interpolate(x, size=(height, width), mode=self.mode, antialias=self.mode != "nearest-exact")
        return y[0].permute(1, 2, 0)

    def square(self, images: list[np.ndarray], size: int) -> list[np.ndarray]:
        """Each image resized to size x size (the random-resized crop was cut by the decoder)."""
        return list(self.pool.map(lambda im: self._resize(im, size, size).contiguous().numpy(), images))

    def resize_crop(self, images: list[np.ndarray], geometry: list[np.ndarray],
                    size: int) -> list[np.ndarray]:
        """timm's eval transform: resize to (height, width), then crop size x size at (top, left)."""
        def one(image: np.ndarray, g: np.ndarray) -> np.ndarray:
            height, width, top, left = (int(v) for v in g)
            resized = self._resize(image, height, width)
            return resized[top:top + size, left:left + size].contiguous().numpy()

        return list(self.pool.map(one, images, geometry))


@do_not_convert  # AutoGraph (the train pipeline's conditionals) must leave the Python callbacks alone
def to_square(images: Any, size: int, interp: str, torch_resize: TorchResize | None) -> Any:
    """The decoded train crop resized to size x size."""
    if torch_resize is None:
        return fn.resize(images, size=[size, size], interp_type=DALI_INTERP[interp], antialias=True)
    return fn.python_function(images, function=lambda ims: torch_resize.square(ims, size),
                              batch_processing=True, output_layouts="HWC")


@do_not_convert
def resize_center_crop(images: Any, geometry: Any, size: int, interp: str,
                       torch_resize: TorchResize | None) -> Any:
    """The decoded val image resized to geometry[:2] (height, width), cropped at geometry[2:] (top, left)."""
    if torch_resize is None:
        resized = fn.resize(images, size=fn.cast(geometry[0:2], dtype=types.FLOAT),
                            interp_type=DALI_INTERP[interp], antialias=True)
        return fn.slice(resized, geometry[2:4], types.Constant(np.array([size, size], np.int32)),
                        axis_names="HW")
    return fn.python_function(images, geometry, batch_processing=True, output_layouts="HWC",
                              function=lambda ims, geo: torch_resize.resize_crop(ims, geo, size))
