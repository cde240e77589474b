"""GC ViT (Hatamizadeh et al., ICML 2023): window attention, blocks -> stage -> model."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from gcvit.kernel_choices import ATTENTION_KINDS, NORM_KINDS
from gcvit.models import attention_flex
from gcvit.models.attention import attention, resolve, windowed_attention
from gcvit.models.conv import GlobalQueryGen, ReduceSize
from gcvit.models.ops import ChannelLayerNorm, LayerNorm
from gcvit.models.timm_api import TimmApi, pretrained_cfg

__all__ = ["GCViT", "stage_window_sizes"]

# Window = stage resolution / ratio: 7, 7, 14, 7 at 224 (stage 3 attends over its whole 14x14 map).
_WINDOW_DIVISOR = (1, 1, 2, 1)


def stage_window_sizes(img_size: int, num_stages: int = 4) -> tuple[int, ...]:
    """Default window per stage: the stage resolution at 1/32 of the image (1/16 for stage 3)."""
    return tuple(img_size // 32 * _WINDOW_DIVISOR[i] for i in range(num_stages))


def relative_position_index(window: int) -> torch.Tensor:
    """Index into a ((2w-1)^2, heads) table for every (query, key) pair of a w x w window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]) + (window - 1)
    return rel[0] * (2 * window - 1) + rel[1]


class WindowAttention(nn.Module):
    """Window attention with relative position bias; keys/values local, queries local or global."""

    def __init__(self, dim: int, num_heads: int, window: int, use_global: bool, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.window, self.use_global = num_heads, window, use_global
        self.kernel = "auto"  # model.attention (GCViT.set_kernels)
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * (2 if use_global else 3), bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # (entries, heads) as in every checkpoint, stored heads-major: forward reads it transposed, so its
        # gradient arrives in this layout, as DDP's buckets and AccumulateGrad want (no per-step copy)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_heads, (2 * window - 1) ** 2).t())
        self.register_buffer("rel_index", relative_position_index(window).flatten(), persistent=False)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, q_global: torch.Tensor | None) -> torch.Tensor:
        """x: (B, H, W, C) whole map; q_global: (B, heads, N, head_dim) in global blocks. Same shape out."""
        B, H, W, C = x.shape
        w, heads = self.window, self.num_heads
        nh, nw, n, d = H // w, W // w, 3 - self.use_global, C // heads
        # index_select: its backward (index_add) is several times faster on CPU than that of table[index];
        # gathering columns of the transposed table yields (heads, N, N) directly and makes the backward
        # add contiguous gradient rows (2x faster than rows of the permuted gradient)
        bias = self.relative_position_bias_table.t().index_select(1, self.rel_index).view(heads, w * w, w * w)
        dropout = self.attn_drop if self.training else 0.0
        kind = resolve(self.kernel, x)
        # qkv on the whole map, then ONE copy into windows: (n, B * windows, heads, tokens, head_dim) where
        # each window is a batch entry, (n, B, heads, windows, tokens, head_dim) where the windows of an image
        # stay together (global blocks share the image's query; flex packs them into one sequence)
        qkv = self.qkv(x).view(B, nh, w, nw, w, n, heads, d)
        if not self.use_global and kind != "flex":
            qkv = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(n, B * nh * nw, heads, w * w, d)
            out = attention(*qkv.unbind(0), bias, dropout, kind)
            out = out.view(B, nh, nw, heads, w, w, d).permute(0, 1, 4, 2, 5, 3, 6)
        else:
            qkv = qkv.permute(5, 0, 6, 1, 3, 2, 4, 7).reshape(n, B, heads, nh * nw, w * w, d)
            if not self.use_global:
                out = windowed_attention(*qkv.unbind(0), bias, dropout, kind)
            elif nh * nw == 1:  # one window: the image's global query is the query, no broadcast needed
                out = attention(q_global, *qkv.squeeze(3).unbind(0), bias, dropout, kind)
            else:
                out = windowed_attention(q_global, *qkv.unbind(0), bias, dropout, kind)
            out = out.view(B, heads, nh, nw, w, w, d).permute(0, 2, 4, 3, 5, 1, 6)
        # (B, nh, w, nw, w, heads, d) -> (B, H, W, C): the second and last copy
        return self.proj_drop(self.proj(out.reshape(B, H, W, C)))


class Mlp(nn.Module):
    """Two-layer GELU MLP over an NHWC map."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fc2(gelu(fc1(x)))."""
        hidden = self.drop(F.gelu(self.fc1(x)))
        return self.drop(self.fc2(hidden))


class GCViTBlock(nn.Module):
    """Pre-norm transformer block over an NHWC map: window attention + MLP, layer scale, drop path."""

    def __init__(self, dim: int, num_heads: int, window: int, use_global: bool, mlp_ratio: float,
                 layer_scale: float | None, drop_path: float, drop: float, attn_drop: float,
                 qkv_bias: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(dim, num_heads, window, use_global, qkv_bias, attn_drop, drop)
        self.norm2 = LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale is not None else None
        self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale is not None else None
        self.register_buffer("keep_prob", torch.tensor(1.0 - drop_path), persistent=False)
        self.drop_path = drop_path

    @property
    def drop_path(self) -> float:
        """This block's stochastic-depth rate."""
        return self._drop_path

    @drop_path.setter
    def drop_path(self, rate: float) -> None:
        self._drop_path = rate
        self.keep_prob.fill_(1.0 - rate)  # the rate a compiled graph reads (_residual)

    def forward(self, x: torch.Tensor, q_global: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C); q_global: the stage's global query (read by global blocks only)."""
        x = self._residual(x, self._attention, q_global if self.attn.use_global else None, self.gamma1)
        return self._residual(x, self._mlp, None, self.gamma2)

    def _attention(self, x: torch.Tensor, q_global: torch.Tensor | None) -> torch.Tensor:
        """The attention branch of the residual stream."""
        return self.attn(self.norm1(x), q_global)

    def _mlp(self, x: torch.Tensor, _: torch.Tensor | None) -> torch.Tensor:
        """The MLP branch of the residual stream (no query)."""
        return self.mlp(self.norm2(x))

    def _residual(self, x: torch.Tensor, branch: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                  q: torch.Tensor | None, gamma: torch.Tensor | None) -> torch.Tensor:
        """x + drop_path(gamma * branch(x, q)): each sample's branch is kept with probability 1 - drop_path
        (timm's draws), the keep mask folded into the residual's scale (one pass). Under torch.compile the
        rate comes from the keep_prob buffer, an input of the graph: a float would be a constant of it, and
        each block (each its own rate) would compile a graph of its own.
        """
        compiling = torch.compiler.is_compiling()
        if not self.training or not (compiling or self.drop_path > 0):
            return _scaled_add(x, branch(x, q), gamma)
        keep = self.keep_prob if compiling else 1.0 - self.drop_path
        scale = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep).div_(keep)
        return torch.addcmul(x, branch(x, q), scale if gamma is None else scale * gamma)


def _scaled_add(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    """x + gamma * y in one pass (gamma: per-channel layer scale or None)."""
    return x + y if gamma is None else torch.addcmul(x, y, gamma)


class GCViTStage(nn.Module):
    """Optional ReduceSize, global query generator, alternating local/global blocks (NCHW in and out)."""

    def __init__(self, dim_in: int, dim: int, depth: int, num_heads: int, resolution: int, window: int,
                 downsample: bool, drop_path: Sequence[float], eps: float, **block_kwargs) -> None:
        super().__init__()
        self.downsample = ReduceSize(dim_in, dim, eps) if downsample else None
        # only odd blocks read the global query: a one-block stage has no use for the generator
        self.global_query = GlobalQueryGen(dim, int(math.log2(resolution // window))) if depth > 1 else None
        self.blocks = nn.ModuleList(
            GCViTBlock(dim, num_heads, window, use_global=i % 2 == 1, drop_path=drop_path[i], eps=eps,
                       **block_kwargs)
            for i in range(depth))
        self.num_heads, self.grad_checkpointing = num_heads, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C, H', W') in channels_last memory."""
        if self.downsample is not None:
            x = self.downsample(x)
        q = x  # unused by local-attention blocks
        if self.global_query is not None:
            g = self.global_query(x)  # (B, w, w, C)
            B, C = g.shape[0], g.shape[-1]
            q = g.reshape(B, -1, self.num_heads, C // self.num_heads).transpose(1, 2)
        x = x.permute(0, 2, 3, 1)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, q, use_reentrant=False)
            else:
                x = blk(x, q)
        return x.permute(0, 3, 1, 2)


class GCViT(TimmApi, nn.Module):
    """Global Context Vision Transformer for any square input whose side is a multiple of 32."""

    def __init__(self, dim: int = 64, depths: Sequence[int] = (3, 4, 19, 5),
                 num_heads: Sequence[int] = (2, 4, 8, 16), *, img_size: int = 224,
                 window_size: int | Sequence[int] | None = None, mlp_ratio: float = 3.0,
                 layer_scale: float | None = None, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 qkv_bias: bool = True, norm_eps: float = 1e-5, attention: str = "auto",
                 norm: str = "auto") -> None:
        super().__init__()
        windows, resolutions = _check_geometry(img_size, window_size, len(depths))
        if len(num_heads) != len(depths):
            raise ValueError(f"num_heads {tuple(num_heads)} needs one entry per stage of depths "
                             f"{tuple(depths)}")
        self.img_size, self.window_sizes, self.num_classes = img_size, windows, num_classes
        dims = [dim * 2 ** i for i in range(len(depths))]
        self.num_features = self.head_hidden_size = dims[-1]
        self.feature_info = [dict(num_chs=d, reduction=4 * 2 ** i, module=f"stages.{i}")
                             for i, d in enumerate(dims)]
        self.stem = nn.Conv2d(in_chans, dim, 3, 2, 1)
        self.stem_reduce = ReduceSize(dim, dim, norm_eps)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))
        self.stages = nn.ModuleList(
            GCViTStage(dims[max(i - 1, 0)], dims[i], depths[i], num_heads[i], resolutions[i], windows[i],
                       downsample=i > 0, drop_path=dpr[i].tolist(), eps=norm_eps, mlp_ratio=mlp_ratio,
                       layer_scale=layer_scale, drop=drop_rate, attn_drop=attn_drop_rate, qkv_bias=qkv_bias)
            for i in range(len(depths)))
        self.norm = ChannelLayerNorm(dims[-1], eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        self.apply(_channels_last_kernels)
        self.pretrained_cfg = pretrained_cfg(img_size, num_classes)
        self.set_kernels(attention, norm)

    @torch.jit.ignore
    def set_kernels(self, attention: str | None = None, norm: str | None = None) -> None:
        """Choose the attention kernel (ATTENTION_KINDS) and LayerNorm's precision (NORM_KINDS) of every
        block; None keeps the current choice. `auto` is the measured choice for the device of each call."""
        choices = (("attention", attention, ATTENTION_KINDS, WindowAttention, "kernel"),
                   ("norm", norm, NORM_KINDS, LayerNorm, "kind"))
        for key, value, kinds, cls, attr in choices:
            if value is None:
                continue
            if value not in kinds:
                raise ValueError(f"{key}={value!r}; choose one of {', '.join(kinds)}")
            for m in self.modules():
                if isinstance(m, cls):
                    setattr(m, attr, value)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay: norms, biases, layer scales, relative-position tables."""
        return {name for name, p in self.named_parameters()
                if p.ndim <= 1 or name.endswith("relative_position_bias_table")}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block in backward instead of storing its activations."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def compile_regions(self) -> list[nn.Module]:
        """The modules torch.compile may compile one by one (regional compilation): every block, every
        downsampler and global-query generator; modules of one class and shape share a compiled graph."""
        parts = [self.stem_reduce]
        for stage in self.stages:
            parts += [m for m in (stage.downsample, stage.global_query) if m is not None] + list(stage.blocks)
        return parts

    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head by a freshly initialised one with num_classes outputs (0: no head)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r}: GC ViT's head average-pools (None or 'avg')")
        self.num_classes = self.pretrained_cfg["num_classes"] = num_classes
        ref = self.stem.weight
        self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype) \
            if num_classes > 0 else nn.Identity()
        self.head.apply(_init_weights)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Stem at 1/4 resolution, kept channels_last: NHWC is what every later op wants."""
        return self.stem_reduce(self.stem(x.contiguous(memory_format=torch.channels_last)))

    def _flex_grids(self, x: torch.Tensor) -> list[tuple[int, int]]:
        """(windows, tokens) of each stage whose attention runs as flex for this input; [] when none does."""
        H, W = x.shape[-2] // 4, x.shape[-1] // 4
        grids = []
        for i, (stage, w) in enumerate(zip(self.stages, self.window_sizes)):
            if resolve(stage.blocks[0].attn.kernel, x) == "flex":
                grids.append(((H >> i) // w * ((W >> i) // w), w * w))
        return grids

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> normalised last-stage map (B, C', H/32, W/32)."""
        grids = self._flex_grids(x)
        if grids:
            attention_flex.prepare(grids, x.device)
        x = self._embed(x)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average-pool and classify (pre_logits: return the pooled features)."""
        x = self.head_drop(x.mean((2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> logits."""
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    """Official init: truncated-normal linear weights (std .02), zero biases."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _channels_last_kernels(m: nn.Module) -> None:
    """Convolution weights wider than 1x1 in channels_last memory, the layout of the maps they run on.

    Their gradients then come out of the convolutions' backward (oneDNN, cuDNN) with the weight's own
    strides, which DDP's gradient buckets require: else it warns that grad strides do not match bucket
    view strides and copies. The 1x1 weights stay as they are: they run through F.linear, as matrices.
    """
    if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1):
        # clone, not contiguous(): a (C, 1, 3, 3) depthwise weight already counts as channels_last
        m.weight.data = m.weight.data.clone(memory_format=torch.channels_last)


def _check_geometry(img_size: int, window_size: int | Sequence[int] | None,
                    num_stages: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-stage windows and resolutions, or a ValueError saying which sizes work."""
    if not isinstance(img_size, int) or img_size <= 0 or img_size % 32:
        raise ValueError(f"img_size={img_size!r} does not work: GC ViT needs a side that is a multiple of 32 "
                         "(e.g. 224, 256, 384, 512)")
    resolutions = tuple(img_size // (4 * 2 ** i) for i in range(num_stages))
    if window_size is None:
        windows = stage_window_sizes(img_size, num_stages)
    else:
        windows = (window_size,) * num_stages if isinstance(window_size, int) else tuple(window_size)
    if len(windows) != num_stages:
        raise ValueError(f"window_size {window_size!r} needs {num_stages} entries, one per stage")
    for i, (r, w) in enumerate(zip(resolutions, windows)):
        if w <= 0 or r % w or (r // w) & (r // w - 1):
            ok = [r // 2 ** k for k in range(8) if r % 2 ** k == 0]
            raise ValueError(f"window_size {w} does not work for stage {i} at img_size {img_size} (a {r}x{r} "
                             f"map): it must be the map side divided by a power of two, one of {ok}")
    return windows, resolutions
