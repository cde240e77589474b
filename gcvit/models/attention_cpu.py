"""The cpu attention form: softmax(q k^T / sqrt(d) + bias) v written for CPU kernels, with its own backward.

It pays on CPU, where the demo and the test suite train (measured against the math form: docs/models.md):
- with gradients, one autograd.Function builds the scores in place in a copy of the bias (scale and bias
  ride in one baddbmm), runs the softmax and its backward in place, and writes the q, k, v gradients straight
  into the packed layout of the qkv projection: autograd's backward of the same math spends two extra
  scaling passes, copies the bias and stacks the three gradients;
- without gradients (eval, export), SDPA's fused CPU kernel with the bias as mask, which never holds the
  scores whole;
- a query shared by the windows of an image (global blocks) costs one GEMM per (image, head) over the keys of
  every window, computed transposed so that the per-window softmax and the value product need no copies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _differentiable() -> bool:
    """Whether the attention must record its backward: not without gradients, nor in a TorchScript trace
    (which cannot record a Python autograd.Function)."""
    return torch.is_grad_enabled() and not torch.jit.is_tracing()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
              dropout: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v for (batch, heads, N, d) tensors and a (heads, N, N) bias."""
    dtype = k.dtype
    if not _differentiable():
        return F.scaled_dot_product_attention(q.to(dtype), k, v, attn_mask=bias.to(dtype)[None],
                                              dropout_p=dropout)
    return packed_attention(torch.stack((k, v)), q, bias, dropout)


def packed_attention(packed: torch.Tensor, q: torch.Tensor | None, bias: torch.Tensor,
                     dropout: float) -> torch.Tensor:
    """attention() of q, k, v packed in one (3, batch, heads, N, d) tensor, or of k, v packed (2, ...)
    and q."""
    if not _differentiable():
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
    """packed_attention() on (batch * heads, N, d) matrices, with a backward written out.

    The scale rides in the GEMMs (alpha, and beta=0 into the gradient buffer), the scores are built in place
    in the repeated bias, and the GEMMs write straight into the packed gradient.
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
    """One query set per image over each of its windows: q (B, heads, N, d); k, v (B, heads, windows, N, d);
    (B, heads, windows, N, d) out. The scores of all windows come from one GEMM per (image, head)."""
    B, heads, nwin, N, d = k.shape
    scores_t = (k.flatten(2, 3) @ (q * d ** -0.5).transpose(-1, -2)).view(B, heads, nwin, N, N)
    probs_t = (scores_t + bias.transpose(-1, -2)[:, None]).softmax(dim=-2)  # softmax over keys
    probs_t = F.dropout(probs_t, dropout, training=dropout > 0)
    return probs_t.transpose(-1, -2) @ v
