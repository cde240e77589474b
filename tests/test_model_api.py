"""Model zoo API: variants, geometry, timm-style methods, grad checkpointing, channels_last, torch.compile."""

from __future__ import annotations

import json

import pytest
import torch

import gcvit
from gcvit.models.attention import MASK_ALIGN, aligned_bias
from gcvit.models.gcvit import GCViT
from gcvit.summary import main as summary_main

OFFICIAL_PARAMS_M = {"gcvit_xxtiny": 12.00, "gcvit_xtiny": 19.98, "gcvit_tiny": 28.22, "gcvit_tiny2": 34.54,
                     "gcvit_small": 51.09, "gcvit_small2": 68.62, "gcvit_base": 90.32, "gcvit_large": 202.08}


def _debug(**kw) -> GCViT:
    torch.manual_seed(0)
    return gcvit.create_model("gcvit_tiny", **{"dim": 32, "depths": (2, 2, 2, 2), "img_size": 64,
                                               "num_classes": 10, **kw})


def test_all_variants_have_the_official_parameter_counts() -> None:
    assert gcvit.list_models() == list(OFFICIAL_PARAMS_M)
    for name, millions in OFFICIAL_PARAMS_M.items():
        with torch.device("meta"):
            model = gcvit.create_model(name)
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions, name
    with torch.device("meta"):  # the official spelling is accepted too
        assert gcvit.create_model("gc_vit_small2").stages[2].blocks[22] is not None


@pytest.mark.parametrize(("size", "windows"), [(224, (7, 7, 14, 7)), (384, (12, 12, 24, 12)),
                                               (512, (16, 16, 32, 16)), (64, (2, 2, 4, 2))])
def test_windows_follow_the_stage_resolution(size: int, windows: tuple[int, ...]) -> None:
    with torch.device("meta"):
        model = gcvit.create_model("gcvit_xxtiny", img_size=size)
    assert model.window_sizes == windows
    assert [b.attn.window for s in model.stages for b in s.blocks[:1]] == list(windows)


def test_bad_geometry_and_overrides_fail_clearly() -> None:
    with pytest.raises(ValueError, match=r"img_size=200 .*multiple of 32 .*224, 256, 384, 512"):
        gcvit.create_model("gcvit_tiny", img_size=200)
    with pytest.raises(ValueError, match=r"window_size 5 does not work for stage 0 .*\[56, 28, 14, 7\]"):
        gcvit.create_model("gcvit_tiny", window_size=5)
    with pytest.raises(ValueError, match=r"unknown GC ViT variant 'gcvit_huge'.*gcvit_xxtiny"):
        gcvit.create_model("gcvit_huge")
    with pytest.raises(TypeError, match=r"create_model\('gcvit_tiny'\).*window"):
        gcvit.create_model("gcvit_tiny", windowsize=7)
    model = gcvit.create_model("gcvit_tiny", dim=32, depths=(1, 1, 1, 1), img_size=64,
                               window_size=(4, 2, 2, 2))
    assert model.window_sizes == (4, 2, 2, 2) and model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_drop_path_defaults_and_override() -> None:
    with torch.device("meta"):
        base = gcvit.create_model("gcvit_base")
        zero = gcvit.create_model("gcvit_base", drop_path_rate=0.0)
    assert base.stages[3].blocks[-1].drop_path == pytest.approx(0.5)  # published rate, last block
    assert base.stages[0].blocks[0].drop_path == 0.0 and zero.stages[3].blocks[-1].drop_path == 0.0
    block = _debug(drop_path_rate=0.5).stages[3].blocks[-1]
    x = torch.zeros(256, 1, 1, 4)

    def ones(x: torch.Tensor, _: None) -> torch.Tensor:
        return torch.ones_like(x)

    kept = block._residual(x, ones, None, None)[:, 0, 0, 0]  # each sample's branch: dropped or scaled 1/keep
    assert set(kept.tolist()) == {0.0, 2.0} and 64 < int((kept == 0).sum()) < 192
    block.eval()
    assert torch.equal(block._residual(x, ones, None, None), torch.ones_like(x))


def test_feature_api_shapes_and_consistency() -> None:
    model = _debug().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
        last, chosen = model.forward_intermediates(x, indices=[1, 3])
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
    assert [info["num_chs"] for info in model.feature_info] == [32, 64, 128, 256]
    torch.testing.assert_close(chosen[1], feats[3])
    torch.testing.assert_close(last, model.forward_features(x))
    assert pooled.shape == (2, 256)
    torch.testing.assert_close(logits, model.get_classifier()(pooled))
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 256)


def test_each_image_keeps_its_own_global_query() -> None:
    model = _debug().eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_no_weight_decay_names_norms_biases_and_tables() -> None:
    model = _debug(layer_scale=1e-5)
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert names <= params.keys()
    assert "stages.0.blocks.0.attn.relative_position_bias_table" in names
    assert {"stages.1.blocks.1.norm1.weight", "stages.1.blocks.1.attn.qkv.bias", "norm.bias", "head.bias",
            "stem_reduce.norm2.weight", "stages.1.blocks.0.gamma1"} <= names
    assert not {"stages.1.blocks.1.attn.qkv.weight", "head.weight", "stem.weight"} & names


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    model = _debug(drop_path_rate=0.5)  # the recomputed blocks must drop the same samples
    x = torch.randn(4, 3, 64, 64)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(1)
        model(x).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in model.stages)
    ckpt = grads()
    assert plain.keys() == ckpt.keys()  # every parameter gets a gradient (no unused ones for DDP)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-4, msg=name)


def test_channels_last_input_gives_the_same_logits() -> None:
    model = _debug().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), model(x))


@pytest.mark.parametrize("name", [*gcvit.list_models(), "debug=tiny"])
def test_every_gradient_has_its_parameter_s_strides(name: str) -> None:
    """DDP's gradient buckets take each parameter's strides and compare a gradient's exactly, size-1
    dimensions included: a depthwise (C, 1, 3, 3) weight whose gradient came back channels_last, and the
    (entries, 1) rel-pos table of a one-head stage (debug=tiny's), made it warn and copy."""
    one_head = dict(dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), window_size=(4, 4, 2, 1))
    debug = name == "debug=tiny"
    model = (gcvit.create_model("gcvit_xxtiny", num_classes=4, img_size=32, **one_head) if debug
             else gcvit.create_model(name, num_classes=4, img_size=64))
    model(torch.randn(1, 3, model.img_size, model.img_size)).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad.stride() == p.stride(), f"{name}.{pname}: grad {p.grad.stride()} vs {p.stride()}"


def test_compiles_with_fullgraph() -> None:
    """fullgraph=True turns any graph break into an error; aot_eager also traces the backward."""
    model = _debug(depths=(1, 2, 1, 1), drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    assert all(p.grad is not None for p in model.parameters())


def test_summary_reports_params_and_gmacs(capsys) -> None:
    assert summary_main(["gcvit_tiny", "gcvit_base", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["params_m"], r["gmacs"]) for r in rows] == [(28.22, 4.76), (90.32, 14.82)]


def test_gpu_attention_path_gives_the_learned_bias_a_gradient_and_never_uses_cudnn() -> None:
    """The CUDA branch, traced on meta tensors (no GPU needed): the whole model's forward and backward run
    and every relative-position table gets a gradient. Negative control: cuDNN attention, which SDPA ranks
    first on sm90 when a mask is given, refuses a mask that requires grad: the branch must not reach it."""
    model = gcvit.create_model("gcvit_xxtiny", num_classes=10, img_size=224).to("meta")
    model(torch.zeros(2, 3, 224, 224, device="meta")).sum().backward()
    tables = [p for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")]
    assert len(tables) == 12 and all(p.grad is not None and p.grad.shape == p.shape for p in tables)
    q = torch.zeros(2, 2, 49, 32, device="meta", dtype=torch.bfloat16)
    mask = torch.zeros(1, 2, 49, 49, device="meta", dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'attn_bias'"):
        torch.ops.aten._scaled_dot_product_cudnn_attention(q, q, q, mask.expand(2, -1, -1, -1), True, 0.0,
                                                           False, False)[0].sum().backward()


def test_aligned_bias_is_a_free_slice_of_padded_rows() -> None:
    """Memory-efficient attention copies a mask whose row strides are not multiples of 8: the bias must
    arrive aligned (49-token rows stored 56 apart), equal to the bias, repeated per window when asked."""
    bias = torch.randn(3, 49, 49)
    mask = aligned_bias(bias, torch.bfloat16, repeats=4)
    assert mask.shape == (1, 12, 49, 49) and mask.dtype == torch.bfloat16
    assert all(s % MASK_ALIGN == 0 for s in mask.stride()[:-1]) and mask.stride(-1) == 1
    torch.testing.assert_close(mask[0].view(3, 4, 49, 49), bias.bfloat16()[:, None].expand(3, 4, 49, 49))
