"""Drop path folded into the residual's scale: the same values, gradients and random draws as timm's
drop_path, and every parameter still gets a gradient (DDP's static graph) when a branch drops the whole
batch."""
from __future__ import annotations

import pytest
import torch
from timm.layers import drop_path

import gcvit
from gcvit.models.gcvit import GCViTBlock


def _block(use_global: bool, drop: float, layer_scale: float | None) -> GCViTBlock:
    torch.manual_seed(0)
    model = gcvit.create_model("gcvit_tiny", dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), img_size=64,
                               num_classes=4, drop_path_rate=drop, layer_scale=layer_scale)
    block = model.stages[1].blocks[int(use_global)]  # 8x8 map, 2x2 windows: the global block broadcasts q
    block.drop_path = drop
    return block.train()


def _inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(batch, 8, 8, 32, requires_grad=True)
    q = torch.randn(batch, 2, 4, 16, requires_grad=True)  # (B, heads, window tokens, head dim)
    return x, q


def _grads(block: GCViTBlock, out: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
    params = list(block.parameters())
    return torch.autograd.grad(out.square().sum(), [*inputs, *params], allow_unused=True)


@pytest.mark.parametrize("use_global", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("layer_scale", [None, 1e-2], ids=["no-scale", "layer-scale"])
def test_drop_path_equals_timms(use_global: bool, layer_scale: float | None) -> None:
    block = _block(use_global, 0.5, layer_scale)
    x, q = _inputs(16)
    torch.manual_seed(2)
    ours = block(x, q)

    torch.manual_seed(2)  # timm: both branches on the whole batch, then drop_path (the same two draws)
    g1 = 1.0 if block.gamma1 is None else block.gamma1
    g2 = 1.0 if block.gamma2 is None else block.gamma2
    x1 = x + drop_path(g1 * block.attn(block.norm1(x), q), 0.5, True)
    ref = x1 + drop_path(g2 * block.mlp(block.norm2(x1)), 0.5, True)

    kept = int((x1 != x).flatten(1).any(1).sum())
    assert 0 < kept < 16  # some samples dropped, some kept
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    for got, want in zip(_grads(block, ours, x, q), _grads(block, ref, x, q)):
        if want is None:  # the local block never reads q
            assert got is None and not use_global
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_a_branch_that_drops_the_whole_batch_still_gives_every_parameter_a_zero_gradient() -> None:
    block = _block(True, 0.999, None)
    x, q = _inputs(2)
    torch.manual_seed(0)
    out = block(x, q)
    assert torch.equal(out, x)  # both branches dropped for both samples
    grad_x, grad_q, *params = _grads(block, out, x, q)
    torch.testing.assert_close(grad_x, 2 * x)
    assert all(g is not None and not g.any() for g in [grad_q, *params])


@pytest.mark.parametrize("layer_scale", [None, 1e-2], ids=["no-scale", "layer-scale"])
def test_under_cpu_autocast_the_residual_has_the_type_of_an_undropped_one(layer_scale: float | None) -> None:
    """Under bf16 autocast the branch is bf16 and the stream may be fp32 or bf16: the scaled branch is added
    in the promoted type, as x + y is when nothing is dropped."""
    for stream in (torch.float32, torch.bfloat16):
        block = _block(True, 0.5, layer_scale)
        x, q = (t.detach().to(stream) for t in _inputs(16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(2)
            dropped = block(x, q)
            block.drop_path = 0.0
            whole = block(x, q)
        assert dropped.dtype == whole.dtype and torch.isfinite(dropped).all(), stream
