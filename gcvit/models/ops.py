"""The device-dependent math of GC ViT: pointwise layers and the two attention forms.

Each function computes the same values on every device; the CPU branches are written for CPU kernels
(oneDNN convolutions, one fused GEMM with the bias) and the others for the fused GPU kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Widest input (channels) that pointwise() runs as a oneDNN convolution on CPU; see pointwise().
CONV_MAX_CHANNELS = 64


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


# Memory-efficient attention reads its additive mask with the strides it is given but pads (copies) any
# mask whose non-last strides are not multiples of 8: N = 49 or 196 tokens would cost a full
# (batch, heads, N, N) copy per call. The bias is therefore laid out in rows of a multiple of 8.
MASK_ALIGN = 8


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


def fused(q: torch.Tensor) -> bool:
    """Whether attention of `q` goes through the fused kernel: off the CPU, head dims the kernel takes."""
    return q.device.type != "cpu" and q.shape[-1] % MASK_ALIGN == 0


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    dropout: float) -> torch.Tensor:
    """SDPA's memory-efficient kernel for (batch, heads, N, d) tensors and an aligned_bias() mask.

    The backend is chosen explicitly: it is the fused kernel whose backward gives the mask its gradient
    (the bias is learned). Flash attention takes no mask, and cuDNN attention, which SDPA ranks first on
    sm90 when a mask is given, is not differentiable with respect to it: the first training step would fail.
    """
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, mask.expand(q.shape[0], -1, -1, -1), True, dropout)[0]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
              dropout: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v for (batch, heads, N, d) tensors and a (heads, N, N) bias.

    Off the CPU: SDPA's memory-efficient kernel (fused_attention). On CPU (and for head dims of reduced
    debug models that the kernel does not take) SDPA has no fused kernel for a mask
    that needs a gradient and its math fallback adds masking passes (all, isneginf, where), so there the same
    math is written out (torch.compile fuses it).
    """
    dtype = k.dtype  # under autocast: the low-precision type of the qkv projection
    if fused(q):
        return fused_attention(q.to(dtype), k, v, aligned_bias(bias, dtype), dropout)
    if not _differentiable():
        # SDPA's fused CPU kernel takes the bias as a mask and never holds the scores whole: 15-30% faster
        # than the written-out forward (its backward could not give the bias a gradient without them)
        return F.scaled_dot_product_attention(q.to(dtype), k, v, attn_mask=bias.to(dtype)[None],
                                              dropout_p=dropout)
    return packed_attention(torch.stack((k, v)), q, bias, dropout)


def _differentiable() -> bool:
    """Whether the CPU attention must record its backward: not without gradients, nor in a TorchScript
    trace (which cannot record a Python autograd.Function)."""
    return torch.is_grad_enabled() and not torch.jit.is_tracing()


def packed_attention(packed: torch.Tensor, q: torch.Tensor | None, bias: torch.Tensor,
                     dropout: float) -> torch.Tensor:
    """attention() of q, k, v packed in one (3, batch, heads, N, d) tensor, or of k, v packed (2, ...) and q.

    The packing is what the qkv projection produces; on CPU the backward then writes the gradients of all
    of them into one tensor of that layout, where unpacked views would cost autograd a stacking copy.
    """
    if fused(packed) or not _differentiable():
        return attention(*(packed.unbind(0) if q is None else (q, *packed.unbind(0))), bias, dropout)
    n, batch, heads, N, d = packed.shape
    dtype = packed.dtype  # under autocast: the qkv projection's low-precision type (out= GEMMs skip autocast)
    q = None if q is None else q.to(dtype).reshape(batch * heads, N, d)
    out = _WindowAttention.apply(packed.reshape(n, batch * heads, N, d), q, bias.to(dtype), dropout)
    return out.view(batch, heads, N, d)


def _attend(packed: torch.Tensor, q: torch.Tensor | None, bias: torch.Tensor,
            dropout: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """packed_attention() on (batch * heads, N, d) matrices: output, probabilities, dropout scale."""
    k, v = packed[-2], packed[-1]
    q = packed[0] if q is None else q
    # scale (alpha) and bias (beta=1) ride in the GEMM, in place into the repeated bias (the out= form, not
    # baddbmm_, so that FlopCounterMode, which knows no in-place variant, counts it)
    scores = q.new_empty(q.shape[0], *bias.shape[1:])
    scores.view(-1, *bias.shape).copy_(bias)  # 3x faster than bias.repeat(), whose copy kernel is slow
    torch.baddbmm(scores, q, k.transpose(-1, -2), alpha=q.shape[-1] ** -0.5, out=scores)
    # the softmax too goes in place (its row kernel reads a row whole before writing it): each new
    # (batch * heads, N, N) tensor costs fresh pages, a quarter of this function's time at N = 196
    probs = torch._softmax(scores, -1, False, out=scores)
    keep = None
    if dropout > 0:
        keep = torch.empty_like(probs).bernoulli_(1 - dropout).div_(1 - dropout)
    return torch.bmm(probs if keep is None else probs * keep, v), probs, keep


class _WindowAttention(torch.autograd.Function):
    """The CPU form of packed_attention() on (batch * heads, N, d) matrices, with a backward written out.

    Autograd's own backward of the same math spends two extra passes scaling the q and k gradients
    (baddbmm's alpha), copies the bias input and stacks the q, k, v gradients; here the scale rides in the
    GEMMs (alpha, and beta=0 into the gradient buffer), the scores are built in place in the repeated bias,
    and the GEMMs write straight into the packed gradient.
    """

    @staticmethod
    def forward(ctx, packed: torch.Tensor, q: torch.Tensor | None, bias: torch.Tensor,
                dropout: float) -> torch.Tensor:
        out, probs, keep = _attend(packed, q, bias, dropout)
        ctx.save_for_backward(packed, packed[0] if q is None else q, probs, keep)
        ctx.scale, ctx.bias_shape, ctx.q_packed = packed.shape[-1] ** -0.5, bias.shape, q is None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        packed, q, probs, keep = ctx.saved_tensors
        k, v = packed[-2], packed[-1]
        grad = grad.contiguous()
        grad_packed = torch.empty_like(packed)
        grad_q = grad_packed[0] if ctx.q_packed else torch.empty_like(q)
        torch.bmm((probs if keep is None else probs * keep).transpose(-1, -2), grad, out=grad_packed[-1])
        grad_s = torch.bmm(grad, v.transpose(-1, -2))  # the probabilities' gradient, then in place:
        if keep is not None:
            grad_s.mul_(keep)
        torch._softmax_backward_data(grad_s, probs, -1, probs.dtype, grad_input=grad_s)  # the scores'
        grad_q.baddbmm_(grad_s, k, beta=0, alpha=ctx.scale)
        grad_packed[-2].baddbmm_(grad_s.transpose(-1, -2), q, beta=0, alpha=ctx.scale)
        grad_bias = grad_s.view(-1, *ctx.bias_shape).sum(0) if ctx.needs_input_grad[2] else None
        return grad_packed, None if ctx.q_packed else grad_q, grad_bias, None


def shared_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                           dropout: float) -> torch.Tensor:
    """Attention of one query set per image over each of its windows: (B, heads, windows, N, d) out.

    q: (B, heads, N, d); k, v: (B, heads, windows, N, d); bias: (heads, N, N).
    Off the CPU the windows become heads of one fused call: the query is expanded per window (a copy the
    size of k) and everything stays in the low-precision type under autocast, where the unfused form would
    promote the (B, heads, windows, N, N) scores to fp32. On CPU the scores of all windows come from ONE GEMM
    per (image, head) (keys of every window against the shared queries), computed transposed so that the
    per-window softmax and the value product need no copies.
    """
    B, heads, nwin, N, d = k.shape
    if fused(q):
        dtype = k.dtype
        q_all = q.to(dtype)[:, :, None].expand(B, heads, nwin, N, d).reshape(B, heads * nwin, N, d)
        mask = aligned_bias(bias, dtype, nwin)
        out = fused_attention(q_all, k.flatten(1, 2), v.flatten(1, 2), mask, dropout)
        return out.view(B, heads, nwin, N, d)
    scores_t = (k.flatten(2, 3) @ (q * d ** -0.5).transpose(-1, -2)).view(B, heads, nwin, N, N)
    probs_t = (scores_t + bias.transpose(-1, -2)[:, None]).softmax(dim=-2)  # softmax over keys
    probs_t = F.dropout(probs_t, dropout, training=dropout > 0)
    return probs_t.transpose(-1, -2) @ v
