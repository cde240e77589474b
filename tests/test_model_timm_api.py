"""timm's uniform model API against timm's own GC ViT with the same weights: forward_intermediates (norm,
output_fmt, stop_early), prune_intermediate_layers, FeatureGetterNet, pretrained_cfg and group_matcher
through timm's data config and optimizer factory."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.models._features import FeatureGetterNet

import gcvit

SIZE = 96  # windows 3, 3, 6, 3: quick on 2 cores, every stage with its own geometry


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """timm's gcvit_xxtiny with perturbed norms, and ours loaded from its state dict (test_model_parity)."""
    torch.manual_seed(0)
    theirs = timm.create_model("gcvit_xxtiny", pretrained=False, img_size=SIZE).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    ours = gcvit.create_model("gcvit_xxtiny", img_size=SIZE).eval()
    gcvit.load_checkpoint(ours, theirs.state_dict())
    return theirs, ours


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    return _pair()


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, atol=2e-5, rtol=0)


@pytest.mark.parametrize("kw", [dict(), dict(indices=2, norm=True), dict(indices=[0, -2], stop_early=True)])
def test_forward_intermediates_equal_timms(pair, kw: dict) -> None:
    theirs, ours = pair
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref_last, ref = theirs.forward_intermediates(x, **kw)
        last, out = ours.forward_intermediates(x, **kw)
        only = ours.forward_intermediates(x, **kw, intermediates_only=True)
        nhwc = ours.forward_intermediates(x, **kw, output_fmt="NHWC", intermediates_only=True)
    _close(out, ref)
    _close(only, ref)
    _close(nhwc, [f.permute(0, 2, 3, 1) for f in ref])
    if not kw.get("stop_early"):
        torch.testing.assert_close(last, ref_last, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="output_fmt='NLC'"):
        ours.forward_intermediates(x, output_fmt="NLC")


def test_prune_and_feature_getter_match_timm() -> None:
    theirs, ours = _pair()
    x = torch.randn(2, 3, SIZE, SIZE)
    assert ours.prune_intermediate_layers([0, -3]) == theirs.prune_intermediate_layers([0, -3]) == [0, 1]
    assert len(ours.stages) == 2 and ours.num_features == theirs.num_features == 128
    assert isinstance(ours.head, torch.nn.Identity) and ours.num_classes == 0
    with torch.no_grad():
        _close(ours.forward_intermediates(x, intermediates_only=True),
               theirs.forward_intermediates(x, intermediates_only=True))
        assert ours(x).shape == (2, 128)  # pooled features of the new last stage

    theirs, ours = _pair()
    ours_net = FeatureGetterNet(ours, out_indices=(1, 3))
    theirs_net = FeatureGetterNet(theirs, out_indices=(1, 3))
    assert ours_net.feature_info.channels() == theirs_net.feature_info.channels() == [128, 512]
    assert ours_net.feature_info.reduction() == theirs_net.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        _close(ours_net(x), theirs_net(x))


def test_pretrained_cfg_gives_timms_data_config() -> None:
    theirs = timm.create_model("gcvit_xxtiny", pretrained=False)
    ours = gcvit.create_model("gcvit_xxtiny")
    assert resolve_data_config(model=ours) == resolve_data_config(model=theirs)
    assert ours.pretrained_cfg["architecture"] == "gcvit_xxtiny" and ours.default_cfg is ours.pretrained_cfg
    assert ours.pretrained_cfg["classifier"] == "head" and ours.get_classifier() is ours.head
    big = gcvit.create_model("gcvit_xxtiny", img_size=384, num_classes=10)
    cfg = resolve_data_config(model=big)
    assert cfg["input_size"] == (3, 384, 384) and cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic"
    big.reset_classifier(3)
    assert big.pretrained_cfg["num_classes"] == 3


def test_timm_optimizer_factory_reads_our_group_matcher() -> None:
    from timm.optim import create_optimizer_v2

    ours = gcvit.create_model("gcvit_xxtiny", img_size=SIZE)
    opt = create_optimizer_v2(ours, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scales = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    # 1 stem + 12 blocks + norm/head = 14 layers: the stem is scaled by 0.5 ** 13, the head not at all
    assert scales[id(ours.stem.weight)] == 0.5 ** 13 and scales[id(ours.head.weight)] == 1.0
    assert scales[id(ours.stages[2].downsample.reduction.weight)] == 0.5 ** (13 - 4)  # with stage 1's last
