"""python -m gcvit.export: every artefact kind reproduces PyTorch, a mismatch fails, bad input is one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gcvit
from gcvit import export as exporter
from gcvit.models.checkpoint import from_native
from gcvit.variants import VARIANTS

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(img_size=64, num_classes=10)


def _checkpoint(path: Path, variant: str = "gcvit_xxtiny", fmt: str = "native", **overrides) -> Path:
    """A one-block-per-stage model of `variant`'s widths, saved in format `fmt`: every op of the variant,
    a fraction of the export time of its full depth."""
    model = gcvit.create_model(variant, depths=(1, 1, 1, 1), **{**SMALL, **overrides})
    torch.nn.init.normal_(model.head.weight, std=0.5)  # logits far from zero: a broken graph shows
    torch.save(from_native(model.state_dict(), fmt), path)
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gcvit.export", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


def test_onnx_matches_pytorch_at_two_batch_sizes_and_writes_the_preprocessing(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "w.pth", "gcvit_base", fmt="official")  # layer scale: every op kind
    res = _run(str(ckpt), str(tmp_path / "m.onnx"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "batch 1:" in res.stdout and "batch 4:" in res.stdout
    report = json.loads((tmp_path / "m.json").read_text())
    assert max(report["max_abs_logit_diff"].values()) <= 1e-4
    assert report["img_size"] == 64 and report["crop_pct"] == 0.875
    assert report["mean"] == [0.485, 0.456, 0.406] and report["std"] == [0.229, 0.224, 0.225]

    import onnxruntime as ort  # the file stands alone: a fresh session at yet another batch size agrees
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 64, 64)
    model = exporter.load(ckpt).model
    with torch.no_grad():
        want = model(x)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert got.shape == (3, 10) and (got - want).abs().max() <= 1e-4


def test_torchscript_matches_pytorch(tmp_path: Path) -> None:
    loaded = exporter.load(_checkpoint(tmp_path / "w.pth", fmt="timm"))
    report = exporter.export(loaded, tmp_path / "m.ts", to="torchscript")
    assert set(report["max_abs_logit_diff"]) == {"1", "4"}
    assert max(report["max_abs_logit_diff"].values()) <= 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_loads_at_another_resolution_and_exports_through_torch_export(tmp_path: Path,
                                                                                  variant: str) -> None:
    ckpt = _checkpoint(tmp_path / "w.pth", variant)
    loaded = exporter.load(ckpt, img_size=96)  # 64 px checkpoint: position tables resampled
    assert loaded.preprocessing.img_size == 96 and f"dim {VARIANTS[variant]['dim']}," in loaded.variant
    report = exporter.export(loaded, tmp_path / "m.pt2", to="exported")
    assert max(report["max_abs_logit_diff"].values()) <= 1e-4


def test_a_run_checkpoint_exports_its_ema_and_its_recipe(tmp_path: Path) -> None:
    model = gcvit.create_model("gcvit_xxtiny", depths=(1, 1, 1, 1), **SMALL)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    config = {"model": {"img_size": 64}, "data": {"crop_pct": 0.95, "interpolation": "bilinear"}}
    torch.save({"model": model.state_dict(), "ema": ema, "progress": {"step": 3}, "config": config,
                "classes": list("abcdefghij")}, tmp_path / "last.pt")
    loaded = exporter.load(tmp_path / "last.pt")
    assert loaded.weights == "ema" and torch.equal(loaded.model.head.weight, ema["head.weight"])
    assert exporter.load(tmp_path / "last.pt", weights="model").weights == "model"
    prep = loaded.preprocessing
    assert (prep.crop_pct, prep.interpolation, prep.class_names) == (0.95, "bilinear", list("abcdefghij"))


def test_a_graph_that_does_not_reproduce_pytorch_fails_and_says_by_how_much(tmp_path: Path,
                                                                          monkeypatch) -> None:
    traced = exporter._EXPORTERS["torchscript"]

    def drifting(*args):  # negative control: an artefact whose logits are off by 1e-3
        run = traced(*args)
        return lambda x: run(x) + 1e-3

    monkeypatch.setitem(exporter._EXPORTERS, "torchscript", drifting)
    loaded = exporter.load(_checkpoint(tmp_path / "w.pth"))
    with pytest.raises(exporter.ExportError, match=r"max \|logit diff\| 0.001 > 0.0001"):
        exporter.export(loaded, tmp_path / "m.ts", to="torchscript")


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    ckpt = _checkpoint(tmp_path / "w.pth")
    cases = {("junk.pth", "m.onnx"): "junk.pth",
             ("other.pth", "m.onnx"): "not a GC ViT checkpoint",
             ("missing.pth", "m.onnx"): "missing.pth",
             ("w.pth", "m.bin", "--to", "exported"): "must end in .pt2",
             ("w.pth", "m.onnx", "--img-size", "100"): "100"}
    for args, needle in cases.items():
        rc = exporter.main([str(tmp_path / a) if i < 2 else a for i, a in enumerate(args)])
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert rc == 1 and not out.out, (args, out.out)
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (args, out.err)
    assert ckpt.exists()
