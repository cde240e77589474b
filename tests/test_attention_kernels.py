"""model.attention and model.norm: every form against the written-out math on CPU, and what a run may choose.

Values and gradients (input, global query, every parameter, the relative-position table included) of sdpa
and math agree on the attention shapes of every variant at 224 px; FlexAttention's forward agrees too (its
backward needs CUDA: tests/gpu); fast LayerNorm stays within bf16 rounding of fp32.
"""
from __future__ import annotations

import pytest
import torch

from gcvit.config import Config
from gcvit.engine.compile import compile_model, kernels
from gcvit.engine.distributed import DistEnv
from gcvit.kernel_choices import RECOMPILE_LIMIT, auto
from gcvit.models import attention_flex, create_model
from gcvit.models.attention import attention
from gcvit.models.gcvit import WindowAttention, stage_window_sizes
from gcvit.models.ops import LayerNorm
from gcvit.variants import VARIANTS

WINDOWS = stage_window_sizes(224)
# The distinct (dim, heads) families of the variants: (xx/x)tiny/tiny2 share one, small/small2 another.
FAMILIES = sorted({(v["dim"], v["num_heads"]) for v in VARIANTS.values()})
CASES = [(dim * 2 ** s, heads[s], 56 >> s, WINDOWS[s], use_global)
         for dim, heads in FAMILIES for s in range(4) for use_global in (False, True)]


def _inputs(dim: int, heads: int, side: int, window: int, use_global: bool, batch: int = 2,
            dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    attn = WindowAttention(dim, heads, window, use_global).to(dtype)
    x = torch.randn(batch, side, side, dim, dtype=dtype, requires_grad=True)
    q = torch.randn(batch, heads, window * window, dim // heads, dtype=dtype,
                    requires_grad=True) if use_global else None
    return attn, x, q


def _close(actual: torch.Tensor, expected: torch.Tensor, bound: float, what: str) -> None:
    """Max error relative to the largest reference value."""
    err = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert err <= bound, f"{what}: relative max error {err:.1e} > {bound:.0e}"


def _outputs(attn: WindowAttention, x: torch.Tensor, q: torch.Tensor | None, kind: str):
    attn.kernel = kind
    out = attn(x, q)
    wrt = [x, *([q] if q is not None else []), *attn.parameters()]
    grad = torch.linspace(-1, 1, out.numel()).view_as(out)
    return out, torch.autograd.grad(out, wrt, grad)


@pytest.mark.parametrize("dim,heads,side,window,use_global", CASES)
def test_sdpa_equals_the_math_with_gradients(dim, heads, side, window, use_global) -> None:
    """In float64: some gradients are sums over thousands of tokens that cancel (the key bias's is 0 in exact
    arithmetic), where fp32 would leave only the order of summation to compare."""
    attn, x, q = _inputs(dim, heads, side, window, use_global, batch=1, dtype=torch.float64)
    ref, ref_grads = _outputs(attn, x, q, "math")
    out, grads = _outputs(attn, x, q, "sdpa")
    _close(out, ref, 1e-10, "sdpa output")
    names = ["x", *(["q_global"] if q is not None else []), *(n for n, _ in attn.named_parameters())]
    for name, a, b in zip(names, grads, ref_grads):
        _close(a, b, 1e-10, f"sdpa gradient of {name}")
    assert ref_grads[-3].abs().sum() > 0  # the relative-position table gets a gradient (a non-trivial one)


def test_the_math_form_is_the_formula() -> None:
    """The reference itself: softmax(q k^T / sqrt(d) + bias) v, window by window, in float64."""
    q, k, v = (torch.randn(3, 2, 49, 8, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(2, 49, 49, dtype=torch.float64)
    expected = torch.stack([torch.stack([torch.softmax(q[b, h] @ k[b, h].T / 8 ** 0.5 + bias[h], -1) @ v[b, h]
                                         for h in range(2)]) for b in range(3)])
    torch.testing.assert_close(attention(q, k, v, bias, 0.0, "math"), expected)


@pytest.mark.parametrize("dim,heads,side,window,use_global", CASES[:8])
def test_flex_forward_equals_the_math_on_cpu(dim, heads, side, window, use_global) -> None:
    """Every stage's shapes (the variants differ from these in their count of heads, which flex treats as
    batch): windows packed per image under the block-diagonal mask (64 and 16 windows), and the one-window
    stages, local and global."""
    attn, x, q = _inputs(dim, heads, side, window, use_global, batch=1)
    x, q = x.detach(), q.detach() if use_global else None  # flex refuses CPU inputs that require grad
    with torch.no_grad():
        attn.kernel = "math"
        ref = attn(x, q)
        attn.kernel = "flex"
        torch.testing.assert_close(attn(x, q), ref, rtol=1e-4, atol=1e-5)


def test_flex_with_a_mask_of_64_token_blocks_equals_the_math(monkeypatch) -> None:
    """The GPU kit's mask64 candidate: the block mask in blocks of 64 tokens (attention_flex.MASK_BLOCK)."""
    monkeypatch.setattr(attention_flex, "MASK_BLOCK", 64)
    attn, x, _ = _inputs(*CASES[0][:4], False, batch=1)  # stage 0: 64 windows of 49 tokens
    with torch.no_grad():
        attn.kernel = "math"
        ref = attn(x.detach(), None)
        attn.kernel = "flex"
        torch.testing.assert_close(attn(x.detach(), None), ref, rtol=1e-4, atol=1e-5)
    assert any(key[3] == 64 for key in attention_flex._MASKS)


def test_flex_in_compiled_blocks_reads_masks_built_once(monkeypatch) -> None:
    """trainer.compile=blocks with flex: the regions read the block masks prepare() built before them (a mask
    built inside a region's graph would be rebuilt every call), and compute what the math form does."""
    torch.manual_seed(0)
    model = create_model("gcvit_xxtiny", num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        built = []
        real = attention_flex.create_block_mask
        monkeypatch.setattr(attention_flex, "create_block_mask",
                            lambda *a, **k: built.append(a[3]) or real(*a, **k))
        monkeypatch.setattr(attention_flex, "_MASKS", {})
        model.set_kernels(attention="flex")
        compile_model(model, model, "blocks", backend="aot_eager")
        torch._dynamo.reset()
        for _ in range(2):
            torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    assert sorted(built) == [16 * 49, 64 * 49]  # stages 0 and 1; stages 2 and 3 are one window each
    assert set(attention_flex._MASKS) == {(64, 49, x.device, 128), (16, 49, x.device, 128)}


def test_compiled_flex_keeps_a_graph_per_shape(monkeypatch) -> None:
    """Past dynamo's default of 8 graphs per function, flex would run its unfused reference: a run meets more
    (4 stages x train and eval batch sizes)."""
    monkeypatch.setattr(attention_flex, "_compiled", [])
    with torch._dynamo.config.patch(recompile_limit=8):
        attention_flex._kernel()
        assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT


def test_what_a_run_may_choose() -> None:
    """flex cannot train on CPU (one line naming the key); trainer.deterministic trades it for sdpa."""
    cpu = DistEnv(0, 1, 0, torch.device("cpu"))
    cfg = Config()
    cfg.model.attention = "flex"
    with pytest.raises(SystemExit, match=r"^config error: model.attention=flex cannot train on CPU"):
        kernels(cfg, cpu, training=True)
    assert kernels(cfg, cpu, training=False) == ("flex", "fp32")
    cfg.trainer.deterministic = True
    assert kernels(cfg, DistEnv(0, 1, 0, torch.device("cuda")), training=True) == ("sdpa", "fp32")


def test_auto_is_the_gpu_familys_choice_then_the_device_types() -> None:
    table = {"cpu": "math", "cuda": "sdpa", "cuda:sm90": "flex", "": "x"}
    assert auto(table, "cuda:sm90") == "flex" and auto(table, "cuda:sm80") == "sdpa"
    assert auto(table, "cpu") == "math" and auto(table, "mps") == "x"


def test_fast_layernorm_is_fp32_within_bf16_rounding() -> None:
    torch.manual_seed(0)
    fp32, fast = LayerNorm(96), LayerNorm(96)
    fast.kind = "fast"
    with torch.no_grad():
        for norm in (fp32, fast):
            norm.weight.copy_(torch.linspace(0.5, 1.5, 96))
            norm.bias.copy_(torch.linspace(-0.1, 0.1, 96))
    x = (torch.randn(4, 7, 7, 96) * 3 + 1).requires_grad_()
    torch.testing.assert_close(fast(x), fp32(x), rtol=0, atol=0)  # without autocast: the same kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = fp32(x), fast(x)
    assert ref.dtype == torch.float32 and out.dtype == torch.bfloat16  # fast: no fp32 copy handed on
    _close(out.float(), ref, 2 ** -7, "fast LayerNorm output")  # bf16 rounds input and output: 8 bits each
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (x, fp32.weight, fp32.bias))
    grads = torch.autograd.grad((out * upstream).sum(), (x, fast.weight, fast.bias))
    for name, a, b in zip(("input", "weight", "bias"), grads, ref_grads):
        assert a.dtype == torch.float32  # the input's and the parameters' gradients stay fp32
        # sums of 196 products of bf16 values: a few bf16 roundings, relative to the largest entry
        _close(a, b, 2 ** -5, f"fast LayerNorm gradient of the {name}")
