"""GPU tier, model: bf16 against fp32, torch.compile against eager, and parity with timm's GC ViT on CUDA
(each attention form and norm against the math form: test_gpu_kernels.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gcvit.models import create_model


def _model(cuda: torch.device, name: str = "gcvit_xxtiny", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=100, img_size=224, drop_path_rate=0.0, **kw).to(cuda)


def _batch(n: int, g: torch.Generator, cuda: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = torch.randn(n, 3, 224, 224, generator=g), torch.randint(0, 100, (n,), generator=g)
    return x.to(cuda), y.to(cuda)


Outputs = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def _loss_and_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None,
                    net: torch.nn.Module | None = None) -> Outputs:
    """Logits, loss and every parameter's gradient of `model`, run through `net` (e.g. compiled) if given."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        logits = (model if net is None else net)(x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    return logits.float().detach(), loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()}


def test_bf16_forward_backward_tracks_fp32(cuda) -> None:
    """bf16 autocast against fp32 on one model: logits within 5% of their range, every parameter's gradient
    pointing the same way (cosine >= 0.97; the relative-position tables included)."""
    model = _model(cuda)
    g = torch.Generator(device="cpu").manual_seed(2)
    x, y = _batch(8, g, cuda)
    ref_logits, ref_loss, ref_grads = _loss_and_grads(model, x, y, None)
    logits, loss, grads = _loss_and_grads(model, x, y, torch.bfloat16)
    err = (logits - ref_logits).abs().max() / ref_logits.abs().max()
    assert err < 0.05, f"bf16 logits differ from fp32 by {err:.3f} of their range"
    assert abs(loss - ref_loss) < 0.02 * ref_loss
    worst = min((F.cosine_similarity(grads[n].flatten(), ref_grads[n].flatten(), dim=0).item(), n)
                for n in ref_grads if ref_grads[n].abs().max() > 0)
    assert worst[0] >= 0.97, f"bf16 gradient of {worst[1]} has cosine {worst[0]:.3f} to fp32"


def test_compiled_model_equals_eager(cuda) -> None:
    """torch.compile(fullgraph=True) on CUDA: the same logits and gradients as eager, in fp32."""
    model = _model(cuda)
    g = torch.Generator(device="cpu").manual_seed(3)
    x, y = _batch(4, g, cuda)
    eager = _loss_and_grads(model, x, y, None)
    compiled = _loss_and_grads(model, x, y, None, net=torch.compile(model, fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-3, rtol=1e-3)
    for n, grad in eager[2].items():
        torch.testing.assert_close(compiled[2][n], grad, atol=1e-3, rtol=1e-2, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", ["gcvit_xxtiny", "gcvit_tiny"])
def test_cuda_logits_equal_cpu_logits_and_timm(cuda, name) -> None:
    """fp32 (TF32 off): our CUDA branch (fused attention, F.linear) gives the CPU branch's logits, which the
    CPU suite proves equal to timm's; and timm's own on CUDA for one image (timm releases before 1.0.31
    tile the global query across the batch instead of per image, so only a single image compares)."""
    timm = pytest.importorskip("timm")
    theirs = timm.create_model(name, pretrained=False, num_classes=100, img_size=224).eval()
    ours = create_model(name, num_classes=100, img_size=224, checkpoint=theirs.state_dict()).eval()
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator(device="cpu").manual_seed(4))
    with torch.inference_mode():
        cpu = ours(x)
        gpu = ours.to(cuda)(x.to(cuda)).cpu()
        timm_one = theirs.to(cuda)(x[:1].to(cuda)).cpu()
    assert cpu.abs().max() > 0.1
    torch.testing.assert_close(gpu, cpu, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(gpu[:1], timm_one, atol=2e-4, rtol=1e-4,
                               msg=lambda m: f"timm {timm.__version__}: {m}")


def test_every_gradient_has_its_parameter_s_strides_on_cuda(cuda) -> None:
    """cuDNN's convolution backward returns each kernel's gradient in the layout the model stores it in
    (channels_last), so DDP's gradient buckets neither warn nor copy (the CPU test checks oneDNN's)."""
    model = create_model("gcvit_xxtiny", num_classes=4, img_size=64).to(cuda)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(torch.randn(2, 3, 64, 64, device=cuda)).float().sum()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad.stride() == p.stride(), f"{name}: grad {p.grad.stride()} vs {p.stride()}"
