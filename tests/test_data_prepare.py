"""python -m gcvit_data.prepare imagenet on small tars in the real layout (generated and sample JPEGs)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from gcvit_data.demo import draw
from gcvit_data.index import DataError
from gcvit_data.pack import main as pack_main
from gcvit_data.prepare import main
from gcvit_data.readers import load_index
from gcvit_data.verify import main as verify_main

# ILSVRC2012_ID order (1, 2, 3) differs from sorted-wnid order: a mapping through the IDs' order would
# put every val image into the wrong class.
WNIDS = ["n03000003", "n01000001", "n02000002"]


def _jpeg(label: int, seed: int) -> bytes:
    buf = io.BytesIO()
    draw(label, np.random.default_rng(seed)).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(path: Path | None, files: dict[str, bytes]) -> bytes:
    """A tar of `files` written to `path` (when given); returns its bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if path is not None:
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _raw(tmp: Path, train: dict[str, list[bytes]], val: list[tuple[bytes, str]], wnids: list[str]) -> Path:
    """ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, LOC_val_solution.csv and a devkit in `tmp`."""
    _tar(tmp / "train.tar", {f"{w}.tar": _tar(None, {f"{w}/{w}_{i}.JPEG": b for i, b in enumerate(imgs)})
                             for w, imgs in train.items()})
    _tar(tmp / "val.tar", {f"ILSVRC2012_val_{n:08d}.JPEG": b for n, (b, _) in enumerate(val, start=1)})
    rows = [f"ILSVRC2012_val_{n:08d},{w} 1 2 30 40 {w} 5 6 70 80" for n, (_, w) in enumerate(val, start=1)]
    (tmp / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows[::-1]) + "\n")
    synsets = np.zeros((len(wnids) + 1, 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"),
                                                   ("num_children", "O")])
    for k, w in enumerate(wnids + ["n09999999"]):  # the last is an inner node of the hierarchy
        synsets[k, 0] = (k + 1, w, f"class {k}", 0 if k < len(wnids) else 2)
    mat = io.BytesIO()
    savemat(mat, {"synsets": synsets})
    truth = "".join(f"{wnids.index(w) + 1}\n" for _, w in val).encode()
    with tarfile.open(tmp / "devkit.tar.gz", "w:gz") as tar:
        for name, data in (("data/meta.mat", mat.getvalue()),
                           ("data/ILSVRC2012_validation_ground_truth.txt", truth)):
            info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tmp


def _check(out: Path, train: dict[str, list[bytes]], val: list[tuple[bytes, str]]) -> None:
    for w, imgs in train.items():
        assert sorted(p.read_bytes() for p in (out / "train" / w).iterdir()) == sorted(imgs)
    for n, (data, w) in enumerate(val, start=1):
        assert (out / "val" / w / f"ILSVRC2012_val_{n:08d}.JPEG").read_bytes() == data
    index = load_index(out, "val")
    assert index.classes == sorted(train)
    for i in range(len(index)):  # labels are sorted-wnid positions
        assert index.classes[index.labels[i]] == index.files[i].split("/")[0]


@pytest.fixture()
def generated(tmp_path: Path) -> tuple[Path, dict, list]:
    train = {w: [_jpeg(k, 10 * k + i) for i in range(3)] for k, w in enumerate(WNIDS)}
    val = [(_jpeg(k, 100 + n), WNIDS[k]) for n, k in enumerate([2, 0, 1, 1, 0, 2, 0])]
    return _raw(tmp_path, train, val, WNIDS), train, val


@pytest.mark.parametrize("labels", ["--val-solution=LOC_val_solution.csv", "--devkit=devkit.tar.gz"])
def test_prepare_imagenet_layout_and_val_mapping(generated, labels: str) -> None:
    raw, train, val = generated
    flag, name = labels.split("=")
    out = raw / "out"
    assert main(["imagenet", "--train-tar", str(raw / "train.tar"), "--val", str(raw / "val.tar"),
                 flag, str(raw / name), "--out", str(out)]) == 0
    _check(out, train, val)
    assert not list(out.glob(".*partial"))
    # started again (e.g. after an interruption): finished parts are kept, the result is the same
    assert main(["imagenet", "--train-tar", str(raw / "train.tar"), "--val", str(raw / "val.tar"),
                 flag, str(raw / name), "--out", str(out)]) == 0
    _check(out, train, val)


def test_label_file_that_does_not_match_is_one_line(generated) -> None:
    raw, _, _ = generated
    csv = raw / "LOC_val_solution.csv"
    csv.write_text("\n".join(csv.read_text().splitlines()[:-1]) + "\n")  # one val image loses its label
    with pytest.raises(DataError, match=r"has no label for ILSVRC2012_val_00000001.JPEG") as err:
        main(["imagenet", "--train-tar", str(raw / "train.tar"), "--val", str(raw / "val.tar"),
              "--val-solution", str(csv), "--out", str(raw / "out")])
    assert "\n" not in str(err.value) and not (raw / "out" / "val").exists()
    with pytest.raises(DataError, match="does not exist"):
        main(["imagenet", "--train-tar", str(raw / "nope.tar"), "--val", str(raw / "val.tar"),
              "--val-solution", str(csv), "--out", str(raw / "out")])


@pytest.mark.sample
def test_prepare_from_sample_images(imagenet_sample: Path, tmp_path: Path) -> None:
    """Real JPEGs and real wnids, whose ILSVRC2012_IDs (classes.tsv order reversed here) are not sorted."""
    wnids = sorted(p.name for p in imagenet_sample.iterdir() if p.is_dir())[:8]
    real = {w: [p.read_bytes() for p in sorted((imagenet_sample / w).iterdir())] for w in wnids}
    val = [(real[w][0], w) for w in wnids[::-1]]
    raw = _raw(tmp_path, real, val, wnids[::-1])
    args = ["imagenet", "--train-tar", str(raw / "train.tar"), "--val", str(raw / "val.tar"),
            "--devkit", str(raw / "devkit.tar.gz")]
    assert main([*args, "--out", str(raw / "out")]) == 0
    _check(raw / "out", real, val)
    assert main([*args, "--out", str(raw / "pack"), "--format", "shards", "--check", "--quiet"]) == 0
    for split in ("train", "val"):
        folder, pack = load_index(raw / "out", split), load_index(raw / "pack", split)
        assert pack.files == folder.files and pack.labels == folder.labels
        assert all(pack.encoded(i) == folder.path(i).read_bytes() for i in range(len(pack)))


def _assert_same_pack(got: Path, want: Path, sources: dict[str, Path]) -> None:
    """Byte-identical shards, index and manifest; only where the files came from differs."""
    manifests = [json.loads((p / "pack.json").read_text()) for p in (got, want)]
    for split, source in sources.items():
        assert manifests[0]["splits"][split].pop("source") == str(source)
    assert [{k: v for k, v in m.items() if k != "source"} for m in manifests][0] == {
        k: v for k, v in manifests[1].items() if k != "source"}
    assert len(manifests[1]["splits"]["train"]["shards"]) > 1
    names = sorted(p.name for p in want.iterdir())
    assert names == sorted(p.name for p in got.iterdir())
    for name in names:
        if name != "pack.json":
            assert (got / name).read_bytes() == (want / name).read_bytes(), name


@pytest.mark.parametrize("val_kind", ["val.tar", "val_folder"])
def test_prepare_shards_is_the_pack_of_the_prepared_folder(generated, val_kind: str) -> None:
    """Straight from the tars (nothing extracted), the pack is byte for byte the one that extracting and then
    gcvit_data.pack write."""
    raw, train, val = generated
    if val_kind == "val_folder":  # --val also takes the extracted flat folder
        with tarfile.open(raw / "val.tar") as tar:
            tar.extractall(raw / val_kind, filter="data")
    args = ["imagenet", "--train-tar", str(raw / "train.tar"), "--val", str(raw / val_kind),
            "--val-solution", str(raw / "LOC_val_solution.csv")]
    assert main([*args, "--out", str(raw / "folder")]) == 0
    assert pack_main([str(raw / "folder"), str(raw / "want"), "--shard-size", "8KB", "--quiet"]) == 0
    assert main([*args, "--out", str(raw / "got"), "--format", "shards", "--shard-size", "8KB", "--workers",
                 "2", "--quiet"]) == 0
    _assert_same_pack(raw / "got", raw / "want", {"train": raw / "train.tar", "val": raw / val_kind})
    index = load_index(raw / "got", "val")
    assert [index.encoded(i) for i in range(len(index))] == [
        (raw / "folder" / "val" / f).read_bytes() for f in index.files]
    assert str(index.path(0)) == f"{raw / val_kind}/{index.files[0]}"  # named in errors


def test_prepare_shards_check_leaves_out_what_verify_rejects(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """--check drops a CMYK JPEG and a truncated one: the pack verify's clean index of the folder gives."""
    train = {w: [_jpeg(k, 10 * k + i) for i in range(3)] for k, w in enumerate(WNIDS)}
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(train[WNIDS[0]][1])).convert("CMYK").save(cmyk, format="JPEG")
    train[WNIDS[0]][1] = cmyk.getvalue()
    train[WNIDS[2]][0] = train[WNIDS[2]][0][:300]
    val = [(_jpeg(k, 100 + n), WNIDS[k]) for n, k in enumerate([2, 0, 1, 1])]
    raw = _raw(tmp_path, train, val, WNIDS)
    args = ["imagenet", "--train-tar", str(raw / "train.tar"), "--val", str(raw / "val.tar"),
            "--val-solution", str(raw / "LOC_val_solution.csv")]
    assert main([*args, "--out", str(raw / "folder")]) == 0
    assert verify_main([str(raw / "folder"), "--workers", "1", "--quiet", "--write-index",
                        str(raw / "ix")]) == 0
    assert pack_main([str(raw / "folder"), str(raw / "want"), "--index-dir", str(raw / "ix"), "--shard-size",
                      "8KB", "--quiet"]) == 0
    capsys.readouterr()
    assert main([*args, "--out", str(raw / "got"), "--format", "shards", "--shard-size", "8KB", "--check",
                 "--workers", "2", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    tar = raw / "train.tar"
    assert lines[:2] == [f"corrupt or truncated (Truncated File Read)\t{tar}/{WNIDS[2]}/{WNIDS[2]}_0.JPEG",
                         f"CMYK JPEG\t{tar}/{WNIDS[0]}/{WNIDS[0]}_1.JPEG"]  # sorted by image
    assert "7 train and 4 val images (2 bad images left out)" in lines[2]
    _assert_same_pack(raw / "got", raw / "want", {"train": tar, "val": raw / "val.tar"})


def test_prepare_shards_needs_an_uncompressed_train_tar(generated) -> None:
    raw, _, _ = generated
    with tarfile.open(raw / "train.tar.gz", "w:gz") as tar:
        tar.add(raw / "train.tar", arcname="n01000001.tar")
    with pytest.raises(DataError, match=r"train.tar.gz is not an uncompressed tar .*decompress it first"):
        main(["imagenet", "--train-tar", str(raw / "train.tar.gz"), "--val", str(raw / "val.tar"),
              "--val-solution", str(raw / "LOC_val_solution.csv"), "--out", str(raw / "p"), "--format",
              "shards"])
    assert not (raw / "p").exists()
