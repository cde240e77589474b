"""The device-dependent math of GC ViT: pointwise layers and the two attention forms.

Each function computes the same values on every device; the CPU branches are written for CPU kernels
(oneDNN convolutions, one fused GEMM with the bias) and the others for the fused GPU kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear over the channels of an NHWC map (B, H, W, C).

    On CPU it runs as a 1x1 convolution of the channels_last NCHW view (both permutes are free views):
    oneDNN's kernels are up to 1.4x faster than the BLAS GEMM of F.linear there, forward plus backward,
    most on the 64-channel maps of the first stages. Elsewhere (cuBLAS) it is F.linear.
    """
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    return F.conv2d(x.permute(0, 3, 1, 2), weight[:, :, None, None], bias).permute(0, 2, 3, 1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
               dropout: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v for (batch, heads, N, d) tensors and a (.., heads, N, N) bias.

    SDPA's fused kernels on GPU take the bias as an additive mask (with its gradient). On CPU SDPA has no
    fused kernel for a mask that needs a gradient and its math fallback adds masking passes (all, isneginf,
    where), so there the same math is written out (torch.compile fuses it).
    """
    if q.device.type != "cpu":  # 4-D mask: the fused kernels accept a broadcast (stride 0) batch
        mask = bias.to(q.dtype).expand(q.shape[0], -1, -1, -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    batch, heads, N, d = q.shape
    # the GEMM adds the bias itself (beta=1) and applies the scale (alpha): no extra passes over q or scores
    attn = torch.baddbmm(bias.expand(batch, heads, N, N).reshape(batch * heads, N, N), q.reshape(-1, N, d),
                         k.reshape(-1, N, d).transpose(-1, -2), alpha=d ** -0.5)
    attn = F.dropout(attn.softmax(-1), dropout, training=dropout > 0)
    return (attn @ v.reshape(-1, N, d)).view(batch, heads, N, d)


def shared_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                            dropout: float) -> torch.Tensor:
    """Attention of one query set per image over each of its windows, without repeating the query.

    q: (B, heads, N, d); k, v: (B, heads, windows, N, d); bias: (heads, N, N). The scores of all windows
    come from ONE GEMM per (image, head) (keys of every window against the shared queries), computed
    transposed so that the per-window softmax and the value product need no copies.
    """
    B, heads, nwin, N, d = k.shape
    scores_t = (k.flatten(2, 3) @ (q * d ** -0.5).transpose(-1, -2)).view(B, heads, nwin, N, N)
    probs_t = (scores_t + bias.transpose(-1, -2)[:, None]).softmax(dim=-2)  # softmax over keys
    probs_t = F.dropout(probs_t, dropout, training=dropout > 0)
    return probs_t.transpose(-1, -2) @ v
