"""Numerical parity with timm's gcvit_* and the official NVlabs key layout."""

from __future__ import annotations

import pytest
import timm
import torch

import gcvit
from gcvit.models.checkpoint import fit_state_dict, from_native

TIMM_VARIANTS = sorted(timm.list_models("gcvit_*"))


def _timm_and_ours(name: str, **kw) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    theirs = timm.create_model(name, pretrained=False, **kw).eval()
    with torch.no_grad():  # timm's init leaves norms at 1/0 and layer scales at 1e-5: perturb those
        for p in theirs.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    ours = gcvit.create_model(name, img_size=kw.get("img_size", 224)).eval()
    gcvit.load_checkpoint(ours, theirs.state_dict())
    return theirs, ours


def test_timm_has_the_variants_we_check() -> None:
    assert set(TIMM_VARIANTS) >= {"gcvit_xxtiny", "gcvit_xtiny", "gcvit_tiny", "gcvit_small", "gcvit_base"}
    assert set(TIMM_VARIANTS) <= set(gcvit.list_models())


def _assert_same_logits(name: str, img_size: int) -> None:
    theirs, ours = _timm_and_ours(name, img_size=img_size)
    x = torch.randn(2, 3, img_size, img_size)  # 2 images: each must keep its own global query
    with torch.no_grad():
        ref, out = theirs(x), ours(x)
    assert ref.abs().max() > 0.1  # a real signal, not a collapsed output
    assert (out - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", TIMM_VARIANTS)
def test_logits_match_timm(name: str) -> None:
    """Every weight and op of each variant, at 96 px (windows 3, 3, 6, 3) to keep 2 CPU cores quick."""
    _assert_same_logits(name, 96)


def test_logits_match_timm_at_224() -> None:
    """The published geometry: windows 7, 7, 14, 7 with 3, 2, 0, 0 pooling levels in the query generator."""
    _assert_same_logits("gcvit_xxtiny", 224)


def test_timm_round_trip_is_exact() -> None:
    theirs, ours = _timm_and_ours("gcvit_xxtiny")
    back = from_native(ours.state_dict(), "timm")
    ref = theirs.state_dict()
    assert back.keys() == ref.keys()
    assert all(torch.equal(back[k], ref[k]) for k in ref)


# Names as published in NVlabs/GCVit models/gc_vit.py: PatchEmbed(proj, conv_down=ReduceSize), levels with
# blocks, q_global_gen.to_q_global (FeatExtract: conv = Sequential(dw, GELU, SE(fc.0, fc.2), pw)), a
# trailing ReduceSize named downsample, final norm and head; gamma1/2 for layer scale.
OFFICIAL_SAMPLE = {
    "patch_embed.proj.weight": (96, 3, 3, 3),
    "patch_embed.proj.bias": (96,),
    "patch_embed.conv_down.norm1.weight": (96,),
    "patch_embed.conv_down.conv.0.weight": (96, 1, 3, 3),
    "patch_embed.conv_down.conv.2.fc.0.weight": (24, 96),
    "patch_embed.conv_down.conv.2.fc.2.weight": (96, 24),
    "patch_embed.conv_down.conv.3.weight": (96, 96, 1, 1),
    "patch_embed.conv_down.reduction.weight": (96, 96, 3, 3),
    "patch_embed.conv_down.norm2.bias": (96,),
    "levels.0.q_global_gen.to_q_global.2.conv.0.weight": (96, 1, 3, 3),
    "levels.2.q_global_gen.to_q_global.0.conv.2.fc.0.weight": (96, 384),
    "levels.0.blocks.0.attn.qkv.weight": (288, 96),
    "levels.0.blocks.1.attn.qkv.weight": (192, 96),
    "levels.0.blocks.1.attn.relative_position_bias_table": (169, 3),
    "levels.0.blocks.1.attn.relative_position_index": (49, 49),
    "levels.2.blocks.18.attn.relative_position_bias_table": (729, 12),
    "levels.2.blocks.18.gamma1": (384,),
    "levels.2.blocks.18.mlp.fc1.weight": (768, 384),
    "levels.0.downsample.reduction.weight": (192, 96, 3, 3),
    "levels.2.downsample.norm2.weight": (768,),
    "norm.weight": (768,),
    "head.weight": (1000, 768),
}


def test_official_layout_matches_the_published_names() -> None:
    with torch.device("meta"):
        model = gcvit.create_model("gcvit_small")
    official = from_native(model.state_dict(), "official")
    assert not any(k.startswith("stages.") or k.startswith("stem") for k in official)
    for key, shape in OFFICIAL_SAMPLE.items():
        assert tuple(official[key].shape) == shape, key
    assert "levels.3.downsample.reduction.weight" not in official  # the last level does not downsample
    index = official["levels.0.blocks.1.attn.relative_position_index"]
    assert index[0, 0] == 84 and index[0, 48] == 0 and index[48, 0] == 168  # Swin's (dy, dx) encoding


def test_official_round_trip_is_exact() -> None:
    model = gcvit.create_model("gcvit_tiny", dim=32, depths=(2, 2, 2, 2), img_size=64, layer_scale=1e-5)
    official = from_native(model.state_dict(), "official")
    back = fit_state_dict({"state_dict": {"module." + k: v for k, v in official.items()}}, model)
    own = model.state_dict()
    assert back.keys() == own.keys()
    assert all(torch.equal(back[k], own[k]) for k in own)
