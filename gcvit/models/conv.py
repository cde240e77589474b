"""GC ViT's convolutional layers: fused MBConv + squeeze-excite, downsampler, global query generator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gcvit.models.ops import ChannelLayerNorm

__all__ = ["GlobalQueryGen", "MBConv", "ReduceSize", "SqueezeExcite"]


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation with GELU and no biases, reduction 4."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim // 4, bias=False)
        self.fc2 = nn.Linear(dim // 4, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rescale channels by a gate computed from their spatial means."""
        # sum, then scale the (B, C) result: mean's backward would divide a full-size gradient copy
        gate = self.fc2(F.gelu(self.fc1(x.sum((2, 3)) / (x.shape[2] * x.shape[3])))).sigmoid()
        return x * gate[:, :, None, None]


class MBConv(nn.Module):
    """Fused-MBConv residual block of the paper: depthwise 3x3, GELU, SE, pointwise 1x1 (NCHW)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False)
        self.se = SqueezeExcite(dim)
        self.conv_pw = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + pw(se(gelu(dw(x))))."""
        y = self.se(F.gelu(self.conv_dw(x)))
        # the 1x1 convolution as a product over the channels: on channels_last maps both permutes are free
        return x + F.linear(y.permute(0, 2, 3, 1), self.conv_pw.weight.flatten(1)).permute(0, 3, 1, 2)


class ReduceSize(nn.Module):
    """Downsampler: norm, MBConv, strided 3x3 conv, norm (NCHW in and out)."""

    def __init__(self, dim: int, dim_out: int, eps: float) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim, eps=eps)
        self.conv = MBConv(dim)
        self.reduction = nn.Conv2d(dim, dim_out, 3, 2, 1, bias=False)
        self.norm2 = ChannelLayerNorm(dim_out, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Halve the resolution."""
        return self.norm2(self.reduction(self.conv(self.norm1(x))))


class GlobalQueryGen(nn.Module):
    """Global query generator: MBConv + 3x3/2 max-pool until the map has the window's size."""

    def __init__(self, dim: int, levels: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(MBConv(dim) for _ in range(max(levels, 1)))
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW stage input -> NHWC global tokens of one window."""
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < self.levels:
                x = F.max_pool2d(x, 3, 2, 1)
        return x.permute(0, 2, 3, 1)
