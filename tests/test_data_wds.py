"""timm's WebDataset shards (written by the webdataset package) read in place: the index is built once from
the tar headers, both loaders give bitwise the folder's batches, no file is opened per image, staging copies
the shards, and a truncated JPEG or a wrong .cls is one line naming the shard and member."""
from __future__ import annotations

import builtins
import os
from pathlib import Path

import pytest
from loader_epochs import assert_same, epoch_batches

from gcvit_data.bench_streams import write_wds
from gcvit_data.demo import write_image_folder
from gcvit_data.eval_sets import timm_info
from gcvit_data.index import DataError
from gcvit_data.readers import load_index
from gcvit_data.readers import wds as wds_reader
from gcvit_data.staging import stage
from gcvit_data.verify import main as verify_main

wds = pytest.importorskip("webdataset")
PER_SHARD = 5  # 18 train images in 4 shards, 6 val images in 2


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("src") / "ds", train_per_class=6, val_per_class=2,
                              num_classes=3, sizes=(40, 90))


def _write(source: Path, out: Path) -> Path:
    return write_wds({"train": load_index(source, "train"), "validation": load_index(source, "val")}, out,
                     PER_SHARD)


@pytest.fixture(scope="module")
def shards(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(source, tmp_path_factory.mktemp("wds") / "imagenet-1k-wds")


def test_the_index_is_built_once_from_the_headers_and_matches_the_folder(source: Path, shards: Path) -> None:
    assert sorted(p.name for p in shards.glob("*.tar"))[0] == "data-train-0000.tar"
    for split in ("train", "val"):
        folder, ix = load_index(source, split), load_index(shards, split)
        assert not ix.by_path and ix.labels == folder.labels and len(ix) == len(folder)
        assert all(ix.encoded(i) == folder.encoded(i) for i in range(len(ix)))
        assert ix.classes == ["0", "1", "2"] and ix.sample(3) == (folder.encoded(3), folder.labels[3], 3)
    in1k = wds_reader.class_names(1000, ["imagenet1k-train-0000.tar"])  # timm's shards: the folder's wnids
    assert in1k == timm_info("imagenet_synsets.txt").split() and in1k == sorted(in1k)
    first = ix.path(0)
    assert first == shards / "data-validation-0000.tar" / "00_circle_val_circle_0000.jpg"
    index = shards / ".gcvit-index" / "train.wds-index.npz"
    built = index.stat().st_mtime_ns
    load_index(shards, "train")
    assert index.stat().st_mtime_ns == built  # read, not rebuilt
    reference = list(wds.WebDataset([str(p) for p in sorted(shards.glob("data-train-*.tar"))],
                                    shardshuffle=False, empty_check=False))
    assert [int(s["cls"]) for s in reference] == load_index(shards, "train").labels


def test_no_file_is_opened_per_image(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ix = load_index(shards, "train")  # opens every shard once

    def refuse(*args, **kwargs):
        raise AssertionError(f"opened {args[0]} while reading images")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(os, "open", refuse)
    assert sum(len(ix.encoded(i)) for i in range(len(ix))) > 0


@pytest.mark.parametrize("loader", ["torch", "dali"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_loaders_give_bitwise_the_folder_batches(source: Path, shards: Path, split: str, loader: str) -> None:
    folder = epoch_batches(source, split, workers=0, loader=loader)
    assert len(folder) >= 2
    assert_same(epoch_batches(shards, split, workers=2, loader=loader), folder)
    if split == "train":
        assert_same(epoch_batches(shards, split, workers=0, resume_after=1, loader=loader), folder)


def test_a_read_only_root_keeps_its_index_in_data_index_dir(source: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    root = _write(source, tmp_path / "ro")
    monkeypatch.setattr(wds_reader.os, "access", lambda path, mode: Path(path) != root)
    with pytest.raises(DataError, match=rf"data.root {root} is read-only .* set data.index_dir"):
        load_index(root, "val")
    index_dir = tmp_path / "index"
    got = load_index(root, "val", index_dir=str(index_dir))
    assert got.labels == load_index(source, "val").labels
    assert (index_dir / "val.wds-index.npz").is_file() and not (root / ".gcvit-index").exists()


def test_staging_copies_the_shards_and_the_copy_is_read(shards: Path, tmp_path: Path, capsys) -> None:
    dest = stage(shards, tmp_path / "nvme")
    assert "unchecked: WebDataset shards carry no checksums" in capsys.readouterr().out
    assert sorted(p.name for p in dest.glob("*.tar")) == sorted(p.name for p in shards.glob("*.tar"))
    assert stage(shards, tmp_path / "nvme") == dest
    copy, original = load_index(dest, "train"), load_index(shards, "train")
    assert copy.labels == original.labels and copy.encoded(7) == original.encoded(7)


def _change(tar: Path, n: int, **members: bytes) -> str:
    """Rewrite `tar` with its n-th sample's members replaced by `members`; returns that sample's key."""
    samples = list(wds.WebDataset(str(tar), shardshuffle=False, empty_check=False))
    with wds.TarWriter(str(tar)) as sink:
        for k, s in enumerate(samples):
            kept = {m: s[m] for m in ("__key__", "jpg", "cls", "json")}
            sink.write({**kept, **(members if k == n else {})})
    return samples[n]["__key__"]


def test_a_wrong_cls_is_one_line_naming_shard_and_member(source: Path, tmp_path: Path) -> None:
    tar = _write(source, tmp_path / "cls") / "data-train-0000.tar"
    key = _change(tar, 2, cls=b"tench")
    with pytest.raises(DataError) as err:
        load_index(tar.parent, "train")
    assert str(err.value) == (f"data error: {tar}: member {key}.cls holds b'tench', not a class index; "
                              "rewrite that sample or drop the shard from _info.json")
    root = _write(source, tmp_path / "val")
    val = root / "data-validation-0000.tar"
    key = _change(val, 1, cls=b"7")
    with pytest.raises(DataError, match=rf"^data error: {val}/{key}.cls is 7, but the train shards have 3 "
                                        "classes; rewrite that sample$"):
        load_index(root, "val")


@pytest.mark.parametrize("loader,workers", [("torch", 1), ("dali", 2)])
def test_a_truncated_jpeg_is_one_line_naming_shard_and_member(source: Path, tmp_path: Path, loader: str,
                                                              workers: int) -> None:
    raw = load_index(source, "train").encoded(2)
    tar = _write(source, tmp_path / "trunc") / "data-train-0000.tar"
    key = _change(tar, 2, jpg=raw[:raw.index(b"\xff\xda") + 12])
    with pytest.raises(DataError) as err:
        epoch_batches(tar.parent, "train", workers=workers, loader=loader)
    msg = str(err.value)
    assert msg.startswith(f"data error: cannot decode {tar}/{key}.jpg (") and "\n" not in msg


def test_verify_names_the_bad_sample_of_the_shards(source: Path, tmp_path: Path, capsys) -> None:
    raw = load_index(source, "train").encoded(4)
    tar = _write(source, tmp_path / "v") / "data-train-0000.tar"
    key = _change(tar, 4, jpg=raw[:len(raw) // 2])
    assert verify_main([str(tar.parent), "--workers", "1", "--quiet"]) == 1
    out = capsys.readouterr()
    assert f"{tar.parent}: indexing the train split's 4 WebDataset shards once" in out.err
    lines = out.out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("corrupt or truncated (")
    assert lines[0].endswith(f"\t{tar}/{key}.jpg")
    assert lines[1] == (f"checked 24 images in {tar.parent} (train: 18, val: 6): 1 bad "
                        "(1 corrupt or truncated)")
    with pytest.raises(DataError, match="--write-index applies to image folders"):
        verify_main([str(tar.parent), "--write-index", str(tmp_path / "clean")])
    (tar.parent / "_info.json").unlink()
    with pytest.raises(DataError, match=r"holds .tar files but no train/ folder, _info.json or pack.json"):
        load_index(tar.parent, "train")
