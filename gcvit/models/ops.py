"""Device-dependent layers of GC ViT besides attention: pointwise projections, LayerNorm's precision.

Each computes the same values on every device; the CPU branch of pointwise() is written for oneDNN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gcvit.kernel_choices import NORM_AUTO

# Widest input (channels) that pointwise() runs as a oneDNN convolution on CPU; see pointwise().
CONV_MAX_CHANNELS = 64

# model.norm: how LayerNorm runs under autocast. fp32: autocast's rule (input cast to fp32, fp32 out);
# fast: on the autocast type with fp32 statistics and fp32 parameters (timm's fast_norm pattern: no fp32
# copy of the input, a low-precision output the next GEMM takes as it is); auto: fp32 until the GPU kit
# measures fast faster (gcvit/kernel_choices.py).


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear over the channels of an NHWC map (B, H, W, C).

    On CPU, maps of up to CONV_MAX_CHANNELS channels run as a 1x1 convolution of the channels_last NCHW
    view (both permutes are free views): there oneDNN's kernels beat the BLAS GEMM of F.linear, forward plus
    backward (64 -> 192 channels at 56x56: 1.22x), while from 128 channels on F.linear is the faster one
    (256 -> 768 at 14x14: 1.07x, 512 -> 1536 at 7x7: 1.2x; torch 2.14, 2 threads, batch 8). Elsewhere
    (cuBLAS) it is F.linear.
    """
    if x.device.type != "cpu" or x.shape[-1] > CONV_MAX_CHANNELS:
        return F.linear(x, weight, bias)
    return F.conv2d(x.permute(0, 3, 1, 2), weight[:, :, None, None], bias).permute(0, 2, 3, 1)


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last dimension, in the precision model.norm chooses (fp32 | fast | auto)."""

    kind = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize each token's channel vector."""
        device = x.device.type
        kind = NORM_AUTO.get(device, "fp32") if self.kind == "auto" else self.kind
        if kind == "fast" and torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            # CPU's kernel takes a low-precision input with fp32 parameters; CUDA's wants one type for all
            # (tests/test_fake_cuda.py), so there the (C,) parameters are cast, as timm's fast_norm does
            weight, bias = (self.weight, self.bias) if device == "cpu" else \
                (self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype))
            with torch.autocast(device, enabled=False):
                return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class ChannelLayerNorm(LayerNorm):
    """LayerNorm over C of an NCHW tensor; a free permute when the tensor is channels_last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize each pixel's channel vector."""
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
