"""python -m gcvit_data.verify finds every kind of bad file; its clean index lets DALI read a whole epoch."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from gcvit_data.config import AugConfig, DataConfig
from gcvit_data.demo import write_image_folder
from gcvit_data.index import DataError
from gcvit_data.loaders import build_loader
from gcvit_data.verify import main


def _bad_files(root: Path) -> dict[str, str]:
    """Plant one file of each bad kind (name -> expected reason) among good ones."""
    good = sorted((root / "train").rglob("*.JPEG"))
    folder = good[0].parent
    (folder / "zero.JPEG").write_bytes(b"")
    data = good[1].read_bytes()
    (folder / "truncated.JPEG").write_bytes(data[: len(data) // 2])
    (folder / "text.JPEG").write_text("<html>404 not found</html>")
    png, cmyk = io.BytesIO(), io.BytesIO()
    Image.open(good[2]).save(png, format="PNG")
    (folder / "png.JPEG").write_bytes(png.getvalue())
    Image.open(good[3]).convert("CMYK").save(cmyk, format="JPEG")
    (folder / "cmyk.JPEG").write_bytes(cmyk.getvalue())
    return {"zero.JPEG": "zero bytes", "truncated.JPEG": "corrupt or truncated",
            "text.JPEG": "not an image", "png.JPEG": "PNG content under a .JPEG name",
            "cmyk.JPEG": "CMYK JPEG"}


def test_verify_reports_each_bad_file_and_writes_a_clean_index(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    root = write_image_folder(tmp_path / "ds", train_per_class=6, val_per_class=2, num_classes=3)
    expected = _bad_files(root)
    assert main([str(root), "--workers", "1", "--quiet"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    reported = {Path(line.split("\t")[1]).name: line.split("\t")[0] for line in lines[:-1]}
    assert set(reported) == set(expected)
    for name, reason in expected.items():
        assert reported[name].startswith(reason), (name, reported[name])
    assert lines[-1].startswith("checked 29 images") and "(train: 23, val: 6): 5 bad (1 " in lines[-1]

    data = DataConfig(root=str(root), loader="dali", batch_size=6, workers=1)
    dirty = build_loader(data, AugConfig(), split="train", img_size=16, seed=0, rank=0, world_size=1,
                         device=torch.device("cpu"))
    with pytest.raises(DataError, match=r"cannot decode .*\.JPEG .*data\.verify"):  # one line naming a file
        list(dirty)

    assert main([str(root), "--workers", "2", "--quiet", "--write-index", str(tmp_path / "clean")]) == 0
    data.index_dir = str(tmp_path / "clean")
    seen = []
    for split in ("train", "val"):
        loader = build_loader(data, AugConfig(), split=split, img_size=16, seed=0, rank=0, world_size=1,
                              device=torch.device("cpu"))
        loader.set_epoch(0)
        seen += [int(i) for b in loader for i in b.ids]
    assert len(seen) == 18 + 6  # every clean train image (18 = 3 full batches of 6) and val image


def test_verify_on_clean_data_and_bad_root(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_image_folder(tmp_path / "ok", train_per_class=2, val_per_class=1, num_classes=2)
    assert main([str(root), "--workers", "1", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().endswith("0 bad")
    with pytest.raises(DataError, match="does not exist"):
        main([str(tmp_path / "missing")])
