"""Checkpoint interop: detection, wrappers, strict errors, rel-pos resizing, safe loading, convert CLI."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import gcvit
from gcvit.convert import main as convert_main
from gcvit.models.checkpoint import (
    CheckpointError,
    detect_format,
    from_native,
    infer_config,
    safe_load,
    unwrap,
)

DEBUG = dict(dim=32, depths=(2, 2, 2, 2), img_size=64, num_classes=10)


def _debug(**kw) -> torch.nn.Module:
    return gcvit.create_model("gcvit_xxtiny", **{**DEBUG, **kw}).eval()


def _same(a: torch.nn.Module, b: torch.nn.Module, size: int = 64) -> bool:
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("fmt", "wrap"), [("native", "ema"), ("timm", "module"), ("official", "state_dict"),
                                         ("official", "plain")])
def test_every_format_and_wrapper_loads(fmt: str, wrap: str) -> None:
    src = _debug(layer_scale=1e-5)
    sd = from_native(src.state_dict(), fmt)
    assert detect_format(sd) == fmt
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3},
           "module": {"module." + k: v for k, v in sd.items()},
           "ema": {"state_dict_ema": {"module." + k: v for k, v in sd.items()}}}[wrap]
    dst = _debug(layer_scale=1e-5)
    gcvit.load_checkpoint(dst, obj)
    assert _same(src, dst)


def test_timm_state_dict_loads_into_create_model(tmp_path: Path) -> None:
    theirs = timm.create_model("gcvit_xxtiny", pretrained=False, img_size=64, num_classes=10).eval()
    torch.save({"state_dict": theirs.state_dict()}, tmp_path / "timm.pth")
    ours = gcvit.create_model("gc_vit_xxtiny", img_size=64, num_classes=10, checkpoint=tmp_path / "timm.pth")
    assert _same(theirs, ours.eval())


def test_mismatch_is_one_line_naming_keys_and_variant() -> None:
    small = _debug(depths=(2, 2, 4, 2))
    with pytest.raises(CheckpointError) as info:
        gcvit.load_checkpoint(_debug(), from_native(small.state_dict(), "official"))
    msg = str(info.value)
    assert "\n" not in msg
    assert "unexpected levels.2.blocks.2.norm1.weight" in msg  # the file's own names, first ones listed
    assert "depths (2, 2, 4, 2)" in msg and "depths (2, 2, 2, 2)" in msg
    with pytest.raises(CheckpointError, match=r"looks like gcvit_xxtiny .*10 classes.*num_classes"):
        ten = gcvit.create_model("gcvit_xxtiny", num_classes=10).state_dict()
        gcvit.load_checkpoint(gcvit.create_model("gcvit_xxtiny"), from_native(ten, "timm"))
    with pytest.raises(CheckpointError, match=r"is not a GC ViT checkpoint .*keys start fc\.weight"):
        gcvit.load_checkpoint(_debug(), {"fc.weight": torch.zeros(2, 2)})


def test_window_change_interpolates_rel_pos_tables() -> None:
    src = _debug()  # 64 px: windows 2, 2, 4, 2
    with torch.no_grad():
        src.stages[0].blocks[0].attn.relative_position_bias_table.fill_(0.25)
    dst = _debug(img_size=128)  # windows 4, 4, 8, 4
    gcvit.load_checkpoint(dst, src.state_dict())
    table = dst.stages[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == (49, 2)
    torch.testing.assert_close(table, torch.full_like(table, 0.25))  # a constant field stays constant
    src_t = src.stages[2].blocks[1].attn.relative_position_bias_table
    dst_t = dst.stages[2].blocks[1].attn.relative_position_bias_table
    assert dst_t.shape == (225, 8) and torch.allclose(dst_t.mean(0), src_t.mean(0), atol=0.02)
    assert torch.isfinite(dst(torch.randn(1, 3, 128, 128))).all()


def test_safe_load_accepts_official_training_checkpoints(tmp_path: Path) -> None:
    model = _debug()
    state = {"state_dict": from_native(model.state_dict(), "official"), "epoch": 299, "arch": "gc_vit_xxtiny",
             "args": argparse.Namespace(lr=1e-3, model="gc_vit_xxtiny"), "metric": np.float64(84.2),
             "version": 2}
    torch.save(state, tmp_path / "official.pth.tar")
    obj = safe_load(tmp_path / "official.pth.tar")
    assert obj["args"].model == "gc_vit_xxtiny" and obj["metric"] == 84.2
    assert unwrap(obj).keys() == state["state_dict"].keys()


class _RunsCode:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safe_load_refuses_code_in_one_line(tmp_path: Path) -> None:
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"state_dict": _debug().state_dict(), "x": _RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError) as info:
        gcvit.load_checkpoint(_debug(), evil)
    msg = str(info.value)
    assert "\n" not in msg and str(evil) in msg and "system" in msg and "arbitrary code" in msg
    assert not marker.exists()


def test_convert_cli_round_trips_every_format(tmp_path: Path) -> None:
    src = _debug(layer_scale=1e-5)
    torch.save({"state_dict": from_native(src.state_dict(), "official")}, tmp_path / "in.pth")
    for fmt, name in (("timm", "t.safetensors"), ("native", "n.pth"), ("official", "o.safetensors")):
        assert convert_main([str(tmp_path / "in.pth"), str(tmp_path / name), "--to", fmt]) == 0
        assert detect_format(unwrap(safe_load(tmp_path / name))) == fmt
        dst = _debug(layer_scale=1e-5)
        gcvit.load_checkpoint(dst, tmp_path / name)
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_convert_reports_bad_input_in_one_line(tmp_path: Path, capsys) -> None:
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    assert convert_main([str(tmp_path / "bad.pth"), str(tmp_path / "o.pth"), "--to", "timm"]) == 1
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert out.out == "" and len(lines) == 1
    assert "bad.pth is not a GC ViT checkpoint" in lines[0] and not (tmp_path / "o.pth").exists()


@pytest.mark.parametrize("fmt", ["native", "timm", "official"])
def test_architecture_is_inferred_from_any_format(fmt: str) -> None:
    """What the converter rebuilds: shapes, depths, heads and the geometry (here a custom window)."""
    kw = dict(dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8), img_size=64, window_size=(4, 2, 2, 2),
              mlp_ratio=2.0, layer_scale=1e-5, num_classes=7)
    model = gcvit.create_model("gcvit_tiny", **kw)
    cfg = infer_config(from_native(model.state_dict(), fmt))
    assert {k: cfg[k] for k in kw} == kw
