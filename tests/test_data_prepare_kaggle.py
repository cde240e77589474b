"""python -m gcvit_data.prepare imagenet --from-kaggle on a small instance of Kaggle's layout (ILSVRC/Data/
CLS-LOC train class folders, flat val files, LOC_val_solution.csv, LOC_synset_mapping.txt): the folder layout
is made of links only and indexes as a copy does; --format shards equals packing a copy; a truncated JPEG
(--check) and a label file that does not match are one line naming the file."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gcvit_data.demo import draw
from gcvit_data.index import DataError
from gcvit_data.pack import pack
from gcvit_data.prepare import main
from gcvit_data.readers import load_index
from gcvit_data.shards import MANIFEST

WNIDS = ["n01440764", "n01443537", "n01484850"]


def _jpeg(label: int, seed: int) -> bytes:
    buf = io.BytesIO()
    draw(label, np.random.default_rng(seed)).save(buf, format="JPEG")
    return buf.getvalue()


def _kaggle(root: Path, drop_label: int | None = None) -> Path:
    """DIR as Kaggle's imagenet-object-localization-challenge unpacks (3 classes, 3 train and 2 val images
    each, one test image); `drop_label`: that val image's row is missing from LOC_val_solution.csv."""
    data = root / "ILSVRC" / "Data" / "CLS-LOC"
    for k, w in enumerate(WNIDS):
        (data / "train" / w).mkdir(parents=True)
        for i in range(3):
            (data / "train" / w / f"{w}_{10 + i}.JPEG").write_bytes(_jpeg(k, 10 * k + i))
    (data / "val").mkdir()
    rows = []
    for n in range(1, 7):
        k = (n * 2) % 3  # val images of all classes interleaved, as in the real set
        (data / "val" / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(_jpeg(k, 100 + n))
        if n != drop_label:
            rows.append(f"ILSVRC2012_val_{n:08d},{WNIDS[k]} 10 20 30 40 {WNIDS[k]} 1 2 3 4")
    (data / "test").mkdir()
    (data / "test" / "ILSVRC2012_test_00000001.JPEG").write_bytes(_jpeg(0, 999))
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows[::-1]) + "\n")
    mapping = "".join(f"{w} class {k}, a name\n" for k, w in enumerate(WNIDS))
    (root / "LOC_synset_mapping.txt").write_text(mapping)
    return root


def _copy(links: Path, to: Path) -> Path:
    """A real copy of the linked layout: what --format folder of the tars would have written."""
    shutil.copytree(links, to, symlinks=False, ignore=shutil.ignore_patterns(".*"))
    return to


def test_links_only_index_like_a_copy_and_the_pack_equals_packing_it(tmp_path, capsys) -> None:
    src = _kaggle(tmp_path / "kaggle")
    assert main(["imagenet", "--from-kaggle", str(src), "--out", str(tmp_path / "root"), "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["labels: LOC_synset_mapping.txt is the standard sorted-wnid order; label i is the i-th of "
                   "the 3 sorted wnids (label 0 = n01440764)",
                   f"links into {src}: keep it",
                   f"{tmp_path / 'root'}: 3 classes, 9 train and 6 val images; next: python -m "
                   f"gcvit_data.verify {tmp_path / 'root'}"]
    root = tmp_path / "root"
    assert all((root / "train" / w).is_symlink() for w in WNIDS)
    files = [p for p in root.rglob("*") if p.is_file() or p.is_symlink()]
    assert files and all(p.is_symlink() for p in files)  # no JPEG was copied
    assert {p.resolve().parent.name for p in (root / "val").rglob("*.JPEG")} == {"val"}
    copy = _copy(root, tmp_path / "copy")
    for split in ("train", "val"):
        ours, theirs = load_index(root, split), load_index(copy, split)
        assert (ours.classes, ours.files, ours.labels) == (theirs.classes, theirs.files, theirs.labels)
        assert all(ours.path(i).read_bytes() == theirs.path(i).read_bytes() for i in range(len(ours)))
    assert load_index(root, "val").labels == [0, 0, 1, 1, 2, 2]  # placed by the solution file, not by name

    assert main(["imagenet", "--from-kaggle", str(src), "--out", str(tmp_path / "pack"), "--format", "shards",
                 "--shard-size", "20KB", "--quiet"]) == 0
    assert not (tmp_path / ".pack.staged").exists()
    pack(copy, tmp_path / "packed", shard_size=20_000, progress=False)
    ours, theirs = (json.loads((tmp_path / d / MANIFEST).read_text()) for d in ("pack", "packed"))
    assert ours["splits"] == theirs["splits"] and sum(len(s["shards"]) for s in ours["splits"].values()) > 2


def test_check_leaves_a_truncated_jpeg_out_in_one_line(tmp_path, capsys) -> None:
    src = _kaggle(tmp_path / "kaggle")
    bad = src / "ILSVRC" / "Data" / "CLS-LOC" / "train" / WNIDS[1] / f"{WNIDS[1]}_11.JPEG"
    bad.write_bytes(bad.read_bytes()[:-200])
    assert main(["imagenet", "--from-kaggle", str(src), "--out", str(tmp_path / "root"), "--check",
                 "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("corrupt or truncated (") and out[0].endswith(f"\t{bad}")
    assert "8 train and 6 val images (1 bad images left out)" in out[-1]
    assert not (tmp_path / "root" / "train" / WNIDS[1]).is_symlink()  # its good images are linked one by one
    assert sorted(p.name for p in (tmp_path / "root" / "train" / WNIDS[1]).iterdir()) == [
        f"{WNIDS[1]}_10.JPEG", f"{WNIDS[1]}_12.JPEG"]


def test_a_label_file_that_does_not_match_is_one_line(tmp_path) -> None:
    src = _kaggle(tmp_path / "kaggle", drop_label=3)
    val = (src / "ILSVRC" / "Data" / "CLS-LOC" / "val").resolve()
    with pytest.raises(DataError) as e:
        main(["imagenet", "--from-kaggle", str(src), "--out", str(tmp_path / "root")])
    assert str(e.value) == (f"data error: {(src / 'LOC_val_solution.csv').resolve()} has no label for "
                            f"ILSVRC2012_val_00000003.JPEG; the label file does not match {val}")
    assert not (tmp_path / "root" / "val").exists()


def test_a_synset_mapping_of_other_classes_is_one_line(tmp_path) -> None:
    src = _kaggle(tmp_path / "kaggle")
    (src / "LOC_synset_mapping.txt").write_text("n01440764 tench\nn01443537 goldfish\nn09999999 other\n")
    line = r"has 3 class folders and .*mapping.txt lists 3 wnids; they differ in 2 \(e.g. n01484850\): is "
    with pytest.raises(DataError, match=line + r"the download complete\?$"):
        main(["imagenet", "--from-kaggle", str(src), "--out", str(tmp_path / "root")])
