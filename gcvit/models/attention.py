"""The attention kernel of GC ViT's window attention: one switch (model.attention), one function per form.

Every form computes softmax(q k^T / sqrt(d) + bias) v with a learned (heads, N, N) relative-position bias:
- sdpa: torch's scaled_dot_product_attention with the bias as additive mask; on CUDA its memory-efficient
  kernel, named explicitly (the one fused kernel whose backward gives the mask its gradient);
- flex: FlexAttention, compiled, the bias read by a score_mod and the windows of an image packed into one
  sequence under a block-diagonal mask (attention_flex.py);
- math: the formula written out, which inductor fuses under torch.compile (what timm's compiled model runs);
  on CPU as fast as a form written for CPU kernels with a backward of its own, which was therefore removed
  (the demo's train step, 1 thread, batch 32: 162.8 ms against 162.7; inference 112.7 ms against 111.6);
- auto: the measured choice for the device (gcvit/kernel_choices.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gcvit.kernel_choices import ATTENTION_AUTO, ATTENTION_KINDS, auto
from gcvit.models import attention_flex

# Memory-efficient attention reads its additive mask with the strides it is given but pads (copies) any
# mask whose non-last strides are not multiples of 8: N = 49 or 196 tokens would cost a full
# (batch, heads, N, N) copy per call. The bias is therefore laid out in rows of a multiple of 8.
MASK_ALIGN = 8


def resolve(kind: str, x: torch.Tensor) -> str:
    """The form `kind` runs as for tensors like x: `auto` becomes the device's measured choice."""
    if kind == "auto":
        return auto(ATTENTION_AUTO, x.device.type)
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention={kind!r} is not a kernel; choose one of {', '.join(ATTENTION_KINDS)}")
    return kind


def aligned_bias(bias: torch.Tensor, dtype: torch.dtype, repeats: int = 1) -> torch.Tensor:
    """(heads, N, N) bias -> (1, heads * repeats, N, N) in `dtype`, rows padded to MASK_ALIGN (a free slice).

    `repeats` > 1 repeats each head's bias for that many consecutive windows (shared-query attention).
    The copy made here is of the bias alone, not of the batch: the batch is a stride-0 expand.
    """
    heads, N, _ = bias.shape
    padded = F.pad(bias.to(dtype), (0, -N % MASK_ALIGN))
    if repeats > 1:
        padded = padded[:, None].expand(heads, repeats, N, padded.shape[-1]).reshape(heads * repeats, N, -1)
    return padded[None, :, :, :N]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
         dropout: float) -> torch.Tensor:
    """SDPA for (batch, heads, N, d) tensors and an aligned_bias() mask.

    On CUDA the backend is named: memory-efficient attention, whose backward gives the mask its gradient
    (the bias is learned). Flash attention takes no mask, and cuDNN attention, which SDPA ranks first on
    sm90 when a mask is given, is not differentiable with respect to it: the first training step would fail.
    Elsewhere (and for head dims the kernel does not take) SDPA picks its backend itself.
    """
    if q.device.type != "cpu" and q.shape[-1] % MASK_ALIGN == 0:
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, mask.expand(q.shape[0], -1, -1, -1), True, dropout)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
         dropout: float) -> torch.Tensor:
    """The formula written out for (batch, heads, N, d) tensors, as timm's: under autocast the scores take
    the fp32 bias's type, the value product the low-precision one."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2) + bias
    return F.dropout(scores.softmax(-1), dropout, training=dropout > 0) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, dropout: float,
              kind: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v for (batch, heads, N, d) tensors and a (heads, N, N) bias."""
    kind = resolve(kind, q)
    dtype = k.dtype  # under autocast: the low-precision type of the qkv projection
    q = q.to(dtype)
    if kind == "sdpa":
        return sdpa(q, k, v, aligned_bias(bias, dtype), dropout)
    if kind == "flex":
        return attention_flex.windows(q[:, :, None], k[:, :, None], v[:, :, None], bias, dropout).squeeze(2)
    return math(q, k, v, bias, dropout)


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, dropout: float,
                       kind: str = "auto") -> torch.Tensor:
    """Attention within each window of an image: (B, heads, windows, N, d) out.

    k, v: (B, heads, windows, N, d); q: the same shape, or (B, heads, N, d), one query set per image shared by
    all its windows (global blocks; expanded per window, a copy the size of k). sdpa makes the windows heads
    of one call, flex packs them into one sequence per image, math broadcasts the bias over them.
    """
    B, heads, nwin, N, d = k.shape
    kind = resolve(kind, k)
    if kind == "flex":
        return attention_flex.windows(q, k, v, bias, dropout)
    dtype = k.dtype
    q = q.to(dtype)
    if q.dim() == 4:
        q = q[:, :, None].expand(B, heads, nwin, N, d)
    if kind == "math":
        return math(q, k, v, bias[:, None], dropout)
    mask = aligned_bias(bias, dtype, nwin)
    out = sdpa(q.reshape(B, heads * nwin, N, d), k.flatten(1, 2), v.flatten(1, 2), mask, dropout)
    return out.view(B, heads, nwin, N, d)
