"""The flex attention form: FlexAttention over the windows of an image packed into one sequence.

A 7x7 window is 49 tokens, which fills a 64- or 128-row tile of a fused kernel badly when each window is a
sequence of its own. Here the windows of one image (and head) are one sequence of windows x 49 tokens under a
block-diagonal mask, so whole tiles are computed and the tiles between windows are skipped. The masks are
built once per shape and device, by prepare() before the model's compiled regions run (a mask built inside a
compiled graph would be rebuilt by every call of it). The relative-position bias is read by a score_mod from
the (heads, N, N) bias of this call, which FlexAttention's backward gives its gradient (on CUDA: CPU has no
flex backward).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from gcvit.kernel_choices import RECOMPILE_LIMIT

# Passed to the CUDA kernel (e.g. {"BLOCK_M": 64, "BLOCK_N": 64}); the GPU kit times choices for head dim 32.
KERNEL_OPTIONS: dict[str, Any] = {}

# Tokens per block of the mask (create_block_mask's BLOCK_SIZE; the kernel's BLOCK_M and BLOCK_N divide it):
# 128 holds 2.6 windows of 49 tokens, 64 wastes fewer masked scores; the GPU kit times both.
MASK_BLOCK = 128

_MASKS: dict[tuple[int, int, torch.device, int], BlockMask] = {}
_compiled: list[Callable[..., torch.Tensor]] = []


def _kernel() -> Callable[..., torch.Tensor]:
    """flex_attention compiled once (eager flex_attention is an unfused reference); inside a compiled region
    the region's compiler takes the plain function."""
    if torch.compiler.is_compiling():
        return flex_attention
    if not _compiled:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _compiled.append(torch.compile(flex_attention, dynamic=False))
    return _compiled[0]


@torch.compiler.disable
def prepare(grids: list[tuple[int, int]], device: torch.device) -> None:
    """Build (once) the masks of these (windows, tokens) grids, outside any compiled graph: compiled regions
    then read them as constants."""
    for windows, tokens in grids:
        if windows > 1:
            block_mask(windows, tokens, device)


def block_mask(windows: int, tokens: int, device: torch.device) -> BlockMask:
    """Block-diagonal mask of `windows` windows of `tokens` tokens: a token attends within its window."""
    key = (windows, tokens, device, MASK_BLOCK)
    if key in _MASKS:
        return _MASKS[key]

    def same_window(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                    kv_idx: torch.Tensor) -> torch.Tensor:
        return q_idx // tokens == kv_idx // tokens

    length = windows * tokens
    mask = create_block_mask(same_window, None, None, length, length, device=device, BLOCK_SIZE=MASK_BLOCK)
    if not torch.compiler.is_compiling():  # a mask traced inside a graph (no prepare()) must not outlive it
        _MASKS[key] = mask
    return mask


def windows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
            dropout: float) -> torch.Tensor:
    """Attention within each window: k, v (B, heads, windows, N, d); q the same or (B, heads, N, d), one
    query set per image shared by its windows (expanded: a copy the size of k); (B, heads, windows, N, d)
    out."""
    if dropout > 0:
        raise ValueError(f"attention dropout {dropout} with model.attention=flex: FlexAttention has none; "
                         "use model.attention=sdpa or math, or attn_drop_rate=0")
    B, heads, nwin, N, d = k.shape
    q = q.to(k.dtype)
    if q.dim() == 4:
        q = q[:, :, None].expand(B, heads, nwin, N, d)
    table = bias.to(torch.float32)

    def add_bias(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                 kv_idx: torch.Tensor) -> torch.Tensor:
        return score + table[h, q_idx % N, kv_idx % N]

    mask = block_mask(nwin, N, k.device) if nwin > 1 else None
    options = KERNEL_OPTIONS if k.device.type == "cuda" and KERNEL_OPTIONS else None
    seq = (B, heads, nwin * N, d)
    out = _kernel()(q.reshape(seq), k.reshape(seq), v.reshape(seq), score_mod=add_bias, block_mask=mask,
                    kernel_options=options)
    return out.view(B, heads, nwin, N, d)
