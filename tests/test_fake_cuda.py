"""Fake-CUDA tier, model: every attention form's and LayerNorm precision's CUDA branch, on every variant's
shapes, runs on CPU under FakeTensorMode (tensors that carry a CUDA device, a shape and a dtype but no
values), so a shape, dtype or device error in a branch only a GPU takes fails here, not in the first GPU
minutes. The autograd engine refuses fake CUDA tensors without a GPU; backward passes run on the meta device.
tests/test_fake_cuda_step.py runs the training step this way; docs/gpu-kit.md lists what stays GPU-only."""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.nn.attention.flex_attention import flex_attention

import gcvit
from gcvit.kernel_choices import ATTENTION_KINDS, NORM_KINDS
from gcvit.models import attention, attention_flex

GPU_FORMS = {"sdpa": (attention, "sdpa"), "math": (attention, "math"), "flex": (attention_flex, "windows")}
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """FakeTensorMode on a CUDA device that autocast accepts (autocast looks for a real one first, and
    without it turns itself off with a warning)."""
    with mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=True), \
            FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def fake_cuda_model(name: str, **kw) -> torch.nn.Module:
    """A variant built on the meta device (no initialisation cost; its constructor reads host values, which
    fake tensors lack), then given fake CUDA storage; call it inside fake_cuda()."""
    with unset_fake_temporarily(), torch.device("meta"):
        model = gcvit.create_model(name, **kw)
    return model.to_empty(device="cuda")


@contextlib.contextmanager
def forms_called() -> Iterator[dict[str, list[tuple]]]:
    """Records each attention form's calls: (output shape, dtype, device) against (v's shape, dtype)."""
    calls: dict[str, list[tuple]] = {kind: [] for kind in GPU_FORMS}

    def spy(kind: str, fn: Callable) -> Callable:
        def call(q, k, v, *args, **kwargs):
            out = fn(q, k, v, *args, **kwargs)
            calls[kind].append((tuple(out.shape), out.dtype, out.device.type, tuple(v.shape), v.dtype))
            return out
        return call

    with contextlib.ExitStack() as stack:
        for kind, (module, fn) in GPU_FORMS.items():
            stack.enter_context(mock.patch.object(module, fn, spy(kind, getattr(module, fn))))
        # FlexAttention's compiled kernel needs a GPU to build; the eager op (whose warning says so) has the
        # same fake shapes
        stack.enter_context(mock.patch.object(attention_flex, "_kernel", lambda: flex_attention))
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
        yield calls


def test_the_tier_covers_every_kernel_choice() -> None:
    """A new attention form or norm precision must join the parametrizations below."""
    assert set(ATTENTION_KINDS) - {"auto"} == set(GPU_FORMS)
    assert set(NORM_KINDS) - {"auto"} == {"fp32", "fast"}


# norm=fast differs from fp32 under autocast only; fp16 takes bf16's code path, once per form with gradients
CASES = [(kind, norm, precision) for kind in GPU_FORMS
         for norm, precision in (("fp32", "bf16"), ("fast", "bf16"), ("fp32", "fp32"))]
CASES += [("sdpa", "fast", "fp16"), ("math", "fast", "fp16")]


@pytest.mark.parametrize(("kind", "norm", "precision"), CASES)
def test_each_attention_form_runs_its_cuda_branch(kind: str, norm: str, precision: str) -> None:
    """gcvit_xxtiny at 224 (windows of 49 and 196 tokens, local and global blocks, one-window stages):
    logits of the right shape and type on CUDA, every attention call through the chosen form (and no
    other), each call's output in v's shape and (under autocast: low-precision) type. Flex runs without
    gradients: its autograd on CUDA needs a GPU (its gradients are in the GPU tier)."""
    with fake_cuda(), forms_called() as calls:
        model = fake_cuda_model("gcvit_xxtiny", num_classes=10, attention=kind, norm=norm)
        x = torch.randn(2, 3, 224, 224, device="cuda")
        grad = torch.no_grad() if kind == "flex" else contextlib.nullcontext()
        with grad, torch.autocast("cuda", dtype=AMP[precision], enabled=AMP[precision] is not None):
            logits = model(x)
    assert (tuple(logits.shape), logits.device.type) == ((2, 10), "cuda")
    assert logits.dtype == (AMP[precision] or torch.float32)
    assert [k for k, c in calls.items() if c] == [kind]
    # 12 blocks; sdpa and math see each global block of a multi-window stage twice (windowed -> sdpa/math)
    assert len(calls[kind]) >= 12
    for out_shape, out_dtype, device, v_shape, v_dtype in calls[kind]:
        assert (out_shape, out_dtype, device) == (v_shape, v_dtype, "cuda")
        assert out_dtype == (AMP[precision] or torch.float32)


@pytest.mark.parametrize("name", gcvit.list_models())
def test_every_variant_runs_its_default_cuda_forward(name: str) -> None:
    """Each variant's shapes (heads, head dims, windows per stage) through the CUDA default (auto
    attention and norm), bf16 autocast, with gradients recorded."""
    with fake_cuda():
        model = fake_cuda_model(name, num_classes=1000)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(torch.randn(1, 3, 224, 224, device="cuda"))
    assert (tuple(logits.shape), logits.dtype, logits.device.type) == ((1, 1000), torch.bfloat16, "cuda")
    assert logits.requires_grad


@pytest.mark.parametrize("img_size", [384, 512])
def test_fine_tuning_resolutions_run_their_cuda_forward(img_size: int) -> None:
    """The fine-tuning sizes: windows of 144 and 256 tokens (multiples of the mask alignment or not)."""
    with fake_cuda():
        model = fake_cuda_model("gcvit_xxtiny", num_classes=10, img_size=img_size)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(torch.randn(1, 3, img_size, img_size, device="cuda"))
    assert tuple(logits.shape) == (1, 10)


def test_set_kernels_switches_a_built_cuda_model() -> None:
    """The kit switches one built model between forms: the next forward takes the new form."""
    with fake_cuda(), forms_called() as calls:
        model = fake_cuda_model("gcvit_xxtiny", num_classes=10)
        x = torch.randn(1, 3, 224, 224, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)
            assert calls["sdpa"] and not calls["math"]  # auto on CUDA
            model.set_kernels(attention="math", norm="fast")
            model(x)
    assert calls["math"]


@pytest.mark.parametrize("kind", ["sdpa", "math"])
def test_cuda_forms_backward_on_meta_gives_every_parameter_its_gradient(kind: str) -> None:
    """The backward of each form with a meta kernel, traced on meta tensors (no GPU needed):
    every parameter, each relative-position table included, gets a gradient of its shape and type, in fp32
    and with a bf16 model. Flex has no meta kernel: its gradients are checked in the GPU tier."""
    for dtype in (torch.float32, torch.bfloat16):
        with torch.device("meta"):
            model = gcvit.create_model("gcvit_xxtiny", num_classes=10, attention=kind).to(dtype)
        model(torch.zeros(2, 3, 224, 224, device="meta", dtype=dtype)).float().sum().backward()
        tables = [n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")]
        assert len(tables) == 12
        for n, p in model.named_parameters():
            assert p.grad is not None, f"{kind}: {n} gets no gradient"
            assert (p.grad.shape, p.grad.dtype) == (p.shape, dtype), n


def test_fast_norm_on_cuda_keeps_the_low_precision_type() -> None:
    """model.norm=fast under bf16 autocast on CUDA: the block's norms return bf16 (no fp32 copy for the
    next GEMM); fp32 returns fp32 (autocast's rule). CUDA's LayerNorm takes one type for input and
    parameters: a bf16 input with fp32 parameters would stop the first step."""
    with fake_cuda():
        model = fake_cuda_model("gcvit_xxtiny", num_classes=10)
        norm = model.stages[0].blocks[0].norm1
        x = torch.randn(2, 56, 56, 64, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model.set_kernels(norm="fast")
            fast = norm(x)
            model.set_kernels(norm="fp32")
            fp32 = norm(x)
    assert (fast.dtype, fp32.dtype) == (torch.bfloat16, torch.float32)
