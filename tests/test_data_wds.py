"""timm's WebDataset shards (written by the webdataset package) read in place: the index is built once from
the tar headers, both loaders give bitwise the folder's batches, no file is opened per image, staging copies
the shards, and a truncated JPEG or a wrong .cls is one line naming the shard and member."""
from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
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


def _write(source: Path, out: Path, per_shard: int = PER_SHARD) -> Path:
    return write_wds({"train": load_index(source, "train"), "validation": load_index(source, "val")}, out,
                     per_shard)


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
    assert not (root / ".gcvit-index").exists()
    other = _write(source, tmp_path / "other")  # a second root sharing the folder keeps its own index
    assert load_index(other, "val", index_dir=str(index_dir)).labels == got.labels
    built = {p: p.stat().st_mtime_ns for p in index_dir.glob("val-*.wds-index.npz")}
    assert len(built) == 2
    load_index(root, "val", index_dir=str(index_dir))
    load_index(other, "val", index_dir=str(index_dir))
    assert {p: p.stat().st_mtime_ns for p in index_dir.glob("val-*.wds-index.npz")} == built  # none rebuilt


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


def test_a_shard_cut_at_a_sample_boundary_is_one_line(source: Path, tmp_path: Path) -> None:
    root = _write(source, tmp_path / "cut")
    tar = root / "data-train-0001.tar"
    samples = list(wds.WebDataset(str(tar), shardshuffle=False, empty_check=False))
    with wds.TarWriter(str(tar)) as sink:  # a valid tar: only the counts show what is missing
        for s in samples[:3]:
            sink.write({m: s[m] for m in ("__key__", "jpg", "cls", "json")})
    with pytest.raises(DataError, match=rf"^data error: {tar} holds 3 samples but _info.json lists 5 for it "
                                        r"\(shard_lengths\); the shard is cut short or is another one: "
                                        "download it again$"):
        load_index(root, "train")
    info = json.loads((root / "_info.json").read_text())
    del info["splits"]["train"]["shard_lengths"]
    (root / "_info.json").unlink()
    (root / "info.json").write_text(json.dumps(info))  # timm reads either name
    with pytest.raises(DataError, match=rf"^data error: the train shards of {root} hold 16 samples but "
                                        "info.json says num_samples 18; a shard is incomplete"):
        load_index(root, "train")


def test_validation_shards_alone_are_read(source: Path, tmp_path: Path) -> None:
    root = _write(source, tmp_path / "valonly")
    for tar in root.glob("data-train-*.tar"):
        tar.unlink()
    val = load_index(root, "val")
    assert val.labels == load_index(source, "val").labels and val.classes == ["0", "1", "2"]
    assert not list((root / ".gcvit-index").glob("train*"))  # no train index needed
    info = json.loads((root / "_info.json").read_text())
    (root / "_info.json").write_text(json.dumps({**info, "num_classes": 5}))
    assert load_index(root, "val").classes == ["0", "1", "2", "3", "4"]
    (root / "_info.json").write_text(json.dumps({**info, "num_classes": 2}))
    with pytest.raises(DataError, match=r"\.cls is 2, but _info.json's num_classes is 2; rewrite that "):
        load_index(root, "val")


LIMITS = """
import json, random, resource, sys
from pathlib import Path
from gcvit_data.readers import load_index
from gcvit_data.readers.wds import WdsReader, build
from gcvit_data.shards import RESERVE_FDS, open_descriptors
from gcvit_data.index import DataError

root, folder = Path(sys.argv[1]), load_index(Path(sys.argv[2]), "train")
want = [folder.encoded(i) for i in range(len(folder))]
order = random.Random(0).sample(range(len(want)), len(want)) * 2
out = {}
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (open_descriptors() + 8, hard))  # a low soft limit is raised
ix = load_index(root, "train")
out["raised"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - open_descriptors()
same = [ix.encoded(i) for i in order] == [want[i] for i in order]
out["all"] = [ix.reader.max_open, len(ix.reader.paths), same, ix.reader.opens]
ix.reader.close()
low = open_descriptors() + RESERVE_FDS + 3  # a hard limit with room for 3 shards
resource.setrlimit(resource.RLIMIT_NOFILE, (low, low))
ix = load_index(root, "train")
out["lru"] = [ix.reader.max_open, [ix.encoded(i) for i in order] == [want[i] for i in order], ix.reader.opens]
ix.reader.close()
header, rows, files = build(root, "train")
reader = WdsReader(root, [s[0] for s in header["shards"]], rows, files)
full = open_descriptors()
resource.setrlimit(resource.RLIMIT_NOFILE, (full, full))  # not one descriptor left
try:
    reader.open_all()
except DataError as e:
    out["emfile"] = str(e)
print(json.dumps(out))
"""


def test_the_open_file_limit_is_raised_or_shards_are_reopened(source: Path, tmp_path: Path) -> None:
    """timm's ImageNet is 1088 tars, past the usual ulimit -n 1024: the soft limit is raised toward the
    hard one; where the hard one is too low the least recently read shards are closed and reopened (each
    read still right), and where no descriptor is left one line says to raise ulimit -n."""
    root = _write(source, tmp_path / "many", per_shard=1)  # 18 train shards
    run = subprocess.run([sys.executable, "-c", LIMITS, str(root), str(source)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["raised"] >= 18 + 256 and out["all"] == [18, 18, True, 18]  # all open, no reopen
    shards, same, opens = out["lru"]
    assert shards == 3 and same and opens > 18  # reads right; a miss costs one open
    assert f"{root}: 18 shards, room for 3 open files in this process (ulimit -n " in run.stderr
    tar = root / "data-train-0000.tar"
    assert out["emfile"].startswith(f"data error: cannot open {tar}: too many open files (this process ")
    assert "raise the limit before training (ulimit -n 65536" in out["emfile"]
    assert "restore" not in out["emfile"] and "\n" not in out["emfile"]
