"""model.pretrained: official, timm, native and run checkpoints initialise a model with another class count
and resolution (head re-initialised, rel-pos tables resampled, everything else exact); EMA chosen by default;
one-line errors."""
from __future__ import annotations

import pytest
import torch
from timm.models.gcvit import GlobalContextVit

import gcvit
from gcvit.engine.pretrained import initialise, read
from gcvit.models.checkpoint import CheckpointError, from_native

ARCH = dict(dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), mlp_ratio=2.0)
TABLE = "relative_position_bias_table"


def _model(num_classes: int, img_size: int = 64) -> torch.nn.Module:
    return gcvit.create_model("gcvit_xxtiny", num_classes=num_classes, img_size=img_size, **ARCH)


def _timm_source() -> torch.nn.Module:
    """timm's own GC ViT at 64 px (windows 2, 2, 4, 2) with 10 classes, norms perturbed off their init."""
    torch.manual_seed(0)
    ref = GlobalContextVit(num_classes=10, img_size=64, embed_dim=32, depths=(2, 2, 2, 2),
                           num_heads=(1, 2, 4, 8), window_size=(2, 2, 4, 2), mlp_ratio=2.0).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return ref


def _assert_backbone_equal(dst: torch.nn.Module, src_native: dict[str, torch.Tensor]) -> None:
    """Every non-head, non-table tensor is the source's exactly."""
    for k, v in dst.state_dict().items():
        if not k.startswith("head.") and not k.endswith(TABLE):
            assert torch.equal(v, src_native[k]), k


@pytest.mark.parametrize("fmt", ["official", "timm", "native"])
def test_each_format_starts_a_run_with_other_classes_and_resolution(tmp_path, fmt: str) -> None:
    theirs = _timm_source()
    src = _model(10)
    gcvit.load_checkpoint(src, theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # the source really is timm's model
        torch.testing.assert_close(src.eval()(x), theirs(x), atol=1e-4, rtol=0)
    native = src.state_dict()
    saved = theirs.state_dict() if fmt == "timm" else from_native(native, fmt)
    torch.save({"state_dict": saved, "epoch": 7}, tmp_path / "w.pth")

    torch.manual_seed(1)
    dst = _model(7, img_size=128)  # windows 4, 4, 8, 4
    lines = initialise(dst, read(tmp_path / "w.pth"), head_init_scale=0.001)
    assert lines[0].startswith(f"pretrained: {tmp_path / 'w.pth'} ({fmt} format, model weights)")
    assert "head re-initialised: checkpoint has 10 classes, this dataset has 7" in lines
    assert ("resolution: 8 relative-position tables resampled (bicubic) from windows (2, 2, 4, 2) to "
            "(4, 4, 8, 4) for 128 px") in lines
    assert all("\n" not in line for line in lines)
    _assert_backbone_equal(dst, native)
    head = dst.head.weight.detach()
    assert head.shape == (7, 256) and not dst.head.bias.any()
    assert 0.8 * 0.02 * 0.001 < float(head.std()) < 1.2 * 0.02 * 0.001  # timm's small init: std .02 x scale
    table = dst.stages[2].blocks[1].attn.relative_position_bias_table
    assert table.shape == (15 * 15, 4) and torch.isfinite(dst(torch.randn(1, 3, 128, 128))).all()


def test_same_classes_and_resolution_load_everything_and_say_nothing_more(tmp_path) -> None:
    src = _model(10)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = _model(10)
    lines = initialise(dst, read(tmp_path / "w.pt"), head_init_scale=0.001)
    assert lines == [f"pretrained: {tmp_path / 'w.pt'} (native format, plain weights); an initialisation: "
                     "optimizer, schedule and data start fresh"]
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())


def _run_checkpoint(tmp_path, *, ema: bool, classes: list[str]) -> tuple[dict, dict]:
    torch.manual_seed(2)
    model, avg = _model(3).state_dict(), _model(3).state_dict()
    torch.save({"model": model, "ema": avg if ema else None, "optimizer": {}, "progress": {"step": 9},
                "classes": classes}, tmp_path / "last.pt")
    return model, avg


def test_run_checkpoint_gives_its_ema_by_default_and_model_on_request(tmp_path) -> None:
    model, avg = _run_checkpoint(tmp_path, ema=True, classes=["a", "b", "c"])
    dst = _model(3)
    lines = initialise(dst, read(tmp_path / "last.pt"), head_init_scale=1.0, classes=["a", "b", "c"])
    assert "(native format, ema weights)" in lines[0] and len(lines) == 1
    assert all(torch.equal(v, avg[k]) for k, v in dst.state_dict().items())
    initialise(dst, read(tmp_path / "last.pt", "model"), head_init_scale=1.0)
    assert all(torch.equal(v, model[k]) for k, v in dst.state_dict().items())


@pytest.mark.parametrize("scored, weights, line", [
    # best.pt: its own evaluation is the run's best
    ({"step": 30, "weights": "model", "top1": 92.5}, "model",
     "the model weights earned the run's best top-1 (92.50); the ema weights on request"),
    # last.pt evaluated after the best: its own score and set, not the run's
    ({"step": 40, "weights": "ema", "top1": 80.0}, "ema",
     "the ema weights scored better at this checkpoint's evaluation (top-1 80.00 at step 40; the run's best "
     "up to then: 92.50, see best.pt); the model weights on request"),
    # a periodic save between evaluations: no score of its own is claimed
    (None, "model", "this checkpoint (step 44) records no evaluation of its own: the model weights, the set "
     "that earned the run's best top-1 up to then (92.50; see best.pt); the ema weights on request"),
])
def test_best_means_what_this_file_scored(tmp_path, scored, weights, line) -> None:
    model, avg = _run_checkpoint(tmp_path, ema=True, classes=["a", "b", "c"])
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    state.update(progress={"step": 44, "best_top1": 92.5, "best_weights": "model"}, scored=scored)
    torch.save(state, tmp_path / "last.pt")
    src = read(tmp_path / "last.pt")
    assert src.weights == weights and src.notes == [line]
    assert all(torch.equal(v, (model if weights == "model" else avg)[k]) for k, v in src.state.items())


def test_run_checkpoint_without_ema_falls_back_to_model_weights_in_one_line(tmp_path) -> None:
    model, _ = _run_checkpoint(tmp_path, ema=False, classes=["a", "b", "c"])
    dst = _model(3)
    lines = initialise(dst, read(tmp_path / "last.pt"), head_init_scale=1.0)
    assert "(native format, model weights)" in lines[0]
    assert f"{tmp_path / 'last.pt'} has no EMA weights; using its model weights" in lines
    assert all(torch.equal(v, model[k]) for k, v in dst.state_dict().items())


def test_same_class_count_with_other_class_names_reinitialises_the_head(tmp_path) -> None:
    model, avg = _run_checkpoint(tmp_path, ema=True, classes=["cat", "dog", "eel"])
    dst = _model(3)
    lines = initialise(dst, read(tmp_path / "last.pt"), head_init_scale=0.001, classes=["cat", "dog", "fox"])
    assert ("head re-initialised: checkpoint's 3 classes are not this dataset's (class 2: 'eel' vs 'fox')"
            in lines)
    assert not torch.equal(dst.head.weight, avg["head.weight"])
    _assert_backbone_equal(dst, avg)


def test_bad_starting_weights_are_one_line(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"^model.pretrained=\S+missing.pth: no such file; pass "):
        read(tmp_path / "missing.pth")
    deeper = gcvit.create_model("gcvit_xxtiny", num_classes=10, img_size=64,
                                **{**ARCH, "depths": (2, 2, 4, 2)})
    torch.save(deeper.state_dict(), tmp_path / "deeper.pth")
    with pytest.raises(CheckpointError) as info:
        initialise(_model(5), read(tmp_path / "deeper.pth"), head_init_scale=0.001)
    msg = str(info.value)
    assert "\n" not in msg and "does not fit this model" in msg and "depths (2, 2, 4, 2)" in msg
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="is not a GC ViT checkpoint"):
        read(tmp_path / "other.pth")


def test_asking_for_model_weights_of_an_ema_only_file_takes_the_ema_in_one_line(tmp_path) -> None:
    avg = _model(3).state_dict()
    torch.save({"state_dict_ema": avg, "epoch": 3}, tmp_path / "ema_only.pth")  # a trimmed timm file
    src = read(tmp_path / "ema_only.pth", "model")
    assert src.weights == "ema" and src.notes == [f"{tmp_path / 'ema_only.pth'} has no model weights; using "
                                                  "its EMA weights"]
    dst = _model(3)
    initialise(dst, src, head_init_scale=1.0)
    assert all(torch.equal(v, avg[k]) for k, v in dst.state_dict().items())
