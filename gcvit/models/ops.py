"""GC ViT's LayerNorms in the precision model.norm chooses (the device-dependent choice besides attention).

The 1x1 projections are F.linear on every device: a oneDNN 1x1 convolution on CPU is no faster on the demo's
train step (1 thread, batch 32: 156 ms against F.linear's 151).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gcvit.kernel_choices import NORM_AUTO, auto

# model.norm: how LayerNorm runs under autocast. fp32: autocast's rule (input cast to fp32, fp32 out);
# fast: on the autocast type with fp32 statistics (timm's fast_norm pattern: no fp32 copy of the input, a
# low-precision output the next GEMM takes as it is); auto: fp32 until the GPU kit measures fast faster
# (gcvit/kernel_choices.py).


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last dimension, in the precision model.norm chooses (fp32 | fast | auto)."""

    kind = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize each token's channel vector."""
        device = x.device.type
        kind = auto(NORM_AUTO, device) if self.kind == "auto" else self.kind
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
