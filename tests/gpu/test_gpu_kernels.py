"""GPU tier, kernels: every model.attention form's values and gradients (q, k, v and the relative-position
table behind the bias) against the definition in fp64, in fp32 (TF32 off) and bf16, for one window and for
the windows of an image with a shared or a per-window query; flex's gradients, which CPU cannot run
(FlexAttention has no CPU backward; its learned-bias gradient comes through atomics); the whole model with
each form and norm against the math form with fp32 LayerNorm (benchmarks/kernel_candidates.py gates its
candidates the same way before timing them, with the same step: kernel_job.logits_and_grads); fast LayerNorm
against fp32 within bf16 rounding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.kernel_job import logits_and_grads
from gcvit.models import create_model
from gcvit.models.attention import attention, windowed_attention
from gcvit.models.gcvit import relative_position_index
from gcvit.models.ops import ChannelLayerNorm, LayerNorm

FORMS = ["sdpa", "flex", "math"]
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}  # bf16 keeps 8 bits of mantissa: relative 2^-8 per value


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Max error relative to the largest reference value, so the bound reads the same for every tensor."""
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    err = (actual.double() - expected.double()).abs().max() / expected.double().abs().max()
    assert err <= TOL[dtype], f"{what}: relative max error {err:.2e} > {TOL[dtype]:.0e} ({dtype})"


def _table(heads: int, window: int, g: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A learned table as the model stores it ((2w-1)^2, heads, fp32) and the (heads, N, N) bias it gives."""
    table = torch.randn((2 * window - 1) ** 2, heads, generator=g).to(device).requires_grad_()
    index = relative_position_index(window).flatten().to(device)
    bias = table.t().index_select(1, index).view(heads, window ** 2, window ** 2)
    return table, bias


def _amp(dtype: torch.dtype) -> torch.autocast:
    """Autocast as the model runs a bf16 step (q, k, v in bf16, the bias table in fp32), off for fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The definition in fp64: softmax(q k^T / sqrt(d) + bias) v."""
    q, k, v, bias = (t.double() for t in (q, k, v, bias))
    return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias).softmax(-1) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [7, 14])  # 49 and 196 tokens: rows the kernels would otherwise pad
@pytest.mark.parametrize("kind", FORMS)
def test_each_form_equals_the_definition_with_the_table_gradient(cuda, kind, window, dtype) -> None:
    g = torch.Generator().manual_seed(0)
    heads, N = 4, window ** 2
    q, k, v = (torch.randn(6, heads, N, 32, generator=g).to(cuda, dtype).requires_grad_() for _ in range(3))
    table, bias = _table(heads, window, g, cuda)
    with _amp(dtype):
        out = attention(q, k, v, bias, 0.0, kind)
    assert out.shape == q.shape and out.dtype == dtype
    grad_out = torch.randn(out.shape, generator=g).to(cuda, dtype)
    ref = _reference(q, k, v, bias)
    _close(out, ref, dtype, f"{kind} output")
    grads = torch.autograd.grad(out, (q, k, v, table), grad_out, retain_graph=True)  # the bias is shared
    refs = torch.autograd.grad(ref, (q, k, v, table), grad_out.double())
    for name, a, b in zip(("q", "k", "v", "relative-position table"), grads, refs):
        _close(a, b, dtype, f"{kind} grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-query", "own-query"])
@pytest.mark.parametrize("kind", FORMS)
def test_windowed_attention_equals_per_window_attention(cuda, kind, shared, dtype) -> None:
    """The windows of an image in one call (flex: packed into one sequence under a block-diagonal mask):
    the global blocks' query (fp32, shared by the windows) or each window's own."""
    g = torch.Generator().manual_seed(1)
    B, heads, nwin, window, d = 3, 2, 4, 7, 32
    N = window ** 2
    q_shape = (B, heads, N, d) if shared else (B, heads, nwin, N, d)
    q = torch.randn(q_shape, generator=g).to(cuda, torch.float32 if shared else dtype).requires_grad_()
    k, v = (torch.randn(B, heads, nwin, N, d, generator=g).to(cuda, dtype).requires_grad_() for _ in range(2))
    table, bias = _table(heads, window, g, cuda)
    with _amp(dtype):
        out = windowed_attention(q, k, v, bias, 0.0, kind)
    assert out.shape == k.shape and out.dtype == dtype
    ref = _reference(q[:, :, None] if shared else q, k, v, bias[:, None])
    grad_out = torch.randn(out.shape, generator=g).to(cuda, dtype)
    _close(out, ref, dtype, f"{kind} output")
    grads = torch.autograd.grad(out, (q, k, v, table), grad_out, retain_graph=True)  # the bias is shared
    refs = torch.autograd.grad(ref, (q, k, v, table), grad_out.double())
    for name, a, b in zip(("q", "k", "v", "relative-position table"), grads, refs):
        _close(a, b, dtype, f"{kind} grad {name}")


@pytest.mark.parametrize("norm", ["fp32", "fast"])
@pytest.mark.parametrize("kind", FORMS)
def test_the_model_with_each_form_and_norm_tracks_the_math_form(cuda, kind, norm) -> None:
    """gcvit_xxtiny at 224 against the math form with fp32 LayerNorm on the same weights: in fp32, the logits
    and every gradient (all 12 tables included); under bf16 autocast, logits within 5% of their range and
    every gradient pointing the same way (cosine >= 0.95) as the math form's bf16 step (how far bf16 is from
    fp32 is test_gpu_model's)."""
    torch.manual_seed(0)
    model = create_model("gcvit_xxtiny", num_classes=100, drop_path_rate=0.0).to(cuda)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, 224, 224, generator=g).to(cuda)
    y = torch.randint(0, 100, (8,), generator=g).to(cuda)
    for dtype in (None, torch.bfloat16):
        model.set_kernels(attention="math", norm="fp32")
        ref_logits, ref_grads = logits_and_grads(model, x, y, dtype)
        model.set_kernels(attention=kind, norm=norm)
        logits, grads = logits_and_grads(model, x, y, dtype)
        if dtype is None:
            torch.testing.assert_close(logits, ref_logits, atol=1e-3, rtol=1e-3)
            for n, grad in ref_grads.items():
                torch.testing.assert_close(grads[n], grad, atol=1e-3, rtol=1e-2,
                                           msg=lambda m, n=n: f"{kind}/{norm} {n}: {m}")
            continue
        err = (logits - ref_logits).abs().max() / ref_logits.abs().max()
        assert err < 0.05, f"{kind}/{norm} bf16 logits off the math form's by {err:.3f}"
        worst = min((F.cosine_similarity(grads[n].flatten(), ref_grads[n].flatten(), dim=0).item(), n)
                    for n in ref_grads if ref_grads[n].abs().max() > 0)
        assert worst[0] >= 0.95, f"{kind}/{norm}: bf16 gradient of {worst[1]} has cosine {worst[0]:.3f}"


@pytest.mark.parametrize("cls", [LayerNorm, ChannelLayerNorm])
def test_fast_layernorm_is_fp32_within_bf16_rounding_on_cuda(cuda, cls) -> None:
    """model.norm=fast on CUDA (the parameters cast to the autocast type, as timm's fast_norm) at the model's
    narrowest and widest channels: without autocast the fp32 kernel itself; under bf16 autocast a bf16 output
    within 2^-7 of the fp32 form's largest value (input and output rounded once each) and fp32 gradients of
    input, weight and bias within 2^-5 (sums of bf16 products), as the CPU test bounds them."""
    g = torch.Generator().manual_seed(0)
    for dim in (64, 512):
        ref, fast = cls(dim).to(cuda), cls(dim).to(cuda)
        ref.kind, fast.kind = "fp32", "fast"
        with torch.no_grad():
            for a, b in zip(ref.parameters(), fast.parameters()):
                a.copy_(torch.rand(a.shape, generator=g) + 0.5)
                b.copy_(a)
        shape = (4, dim, 14, 14) if cls is ChannelLayerNorm else (4, 14, 14, dim)
        x = (torch.randn(shape, generator=g) * 3 + 1).to(cuda).contiguous(
            memory_format=torch.channels_last if cls is ChannelLayerNorm else torch.contiguous_format)
        x.requires_grad_()
        assert torch.equal(fast(x), ref(x))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            want, got = ref(x), fast(x)
        assert want.dtype == torch.float32 and got.dtype == torch.bfloat16
        bound = want.abs().max().item()
        torch.testing.assert_close(got.float(), want, rtol=0, atol=2 ** -7 * bound)
        upstream = torch.randn(shape, generator=g).to(cuda)
        wants = torch.autograd.grad((want * upstream).sum(), (x, *ref.parameters()))
        gots = torch.autograd.grad((got * upstream).sum(), (x, *fast.parameters()))
        for name, a, b in zip(("input", "weight", "bias"), gots, wants):
            what = f"{cls.__name__}({dim}) {name} gradient"
            assert a.dtype == torch.float32, f"{what} in {a.dtype}"
            torch.testing.assert_close(a, b, rtol=0, atol=2 ** -5 * b.abs().max().item(),
                                       msg=lambda m, w=what: f"{w}: {m}")
