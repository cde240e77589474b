"""python -m gcvit_data.pack writes shards that hold the source bytes in index order, that tar, webdataset and
DALI read as they are, atomically; python -m gcvit_data.verify finds a changed byte and names where it is."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from loader_epochs import assert_same as _assert_same
from loader_epochs import epoch_batches as _batches
from PIL import Image

from gcvit_data import pack as pack_module
from gcvit_data.demo import write_image_folder
from gcvit_data.index import BadImage, DataError
from gcvit_data.pack import main as pack_main
from gcvit_data.readers import load_index
from gcvit_data.shards import PackReader, Split, is_pack
from gcvit_data.verify import main as verify_main

SHARD = "16KB"  # 3-6 images of 40-90 px per shard: several shards per split


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("src") / "ds", train_per_class=6, val_per_class=2,
                              num_classes=3, sizes=(40, 90))


@pytest.fixture(scope="module")
def packed(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pack") / "out"
    assert pack_main([str(source), str(out), "--shard-size", SHARD, "--workers", "2", "--quiet"]) == 0
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_pack_holds_every_source_file_in_index_order(source: Path, packed: Path) -> None:
    assert is_pack(packed) and not is_pack(source)
    for split in ("train", "val"):
        ix, sp = load_index(source, split), Split.load(packed, split)
        assert len(sp) == len(ix) and sp.classes == ix.classes and sp.files == ix.files
        assert sp.samples["label"].tolist() == ix.labels
        assert len(sp.shards) >= 2 and all(s["bytes"] <= 16000 for s in sp.shards)
        reader = PackReader(sp, check=True)
        for i in range(len(ix)):
            assert reader.read(i) == ix.path(i).read_bytes(), (split, i)
        for k, shard in enumerate(sp.shards):
            tar = sp.shard_path(k)
            assert hashlib.sha256(tar.read_bytes()).hexdigest() == shard["sha256"]
            members = subprocess.run(["tar", "-tf", str(tar)], capture_output=True, text=True, check=True)
            assert members.stderr == ""
            ids = range(shard["first"], shard["first"] + shard["samples"])
            assert members.stdout.split() == [f"{i:010d}.{ext}" for i in ids for ext in ("jpg", "cls")]


def test_idx_files_equal_dali_wds2idx_output(packed: Path, tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    import wds2idx  # ships with DALI (tools/wds2idx.py): the reference writer of the format

    for tar in sorted(packed.glob("*.tar")):
        with wds2idx.IndexCreator(str(tar), str(tmp_path / "ref.idx"), verbose=False) as creator:
            creator.create_index()
        assert tar.with_suffix(".idx").read_text() == (tmp_path / "ref.idx").read_text(), tar.name


def test_webdataset_package_reads_the_shards(source: Path, packed: Path) -> None:
    wds = pytest.importorskip("webdataset")
    ix = load_index(source, "train")
    urls = [str(p) for p in sorted(packed.glob("train-*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"{i:010d}" for i in range(len(ix))]
    assert [s["jpg"] for s in samples] == [ix.path(i).read_bytes() for i in range(len(ix))]
    assert [int(s["cls"]) for s in samples] == ix.labels


def test_dali_webdataset_reader_reads_the_shards(source: Path, packed: Path) -> None:
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    ix = load_index(source, "train")
    tars = sorted(packed.glob("train-*.tar"))

    @pipeline_def(batch_size=len(ix), num_threads=1, device_id=None)
    def read():
        jpg, cls = fn.readers.webdataset(paths=[str(t) for t in tars], ext=["jpg", "cls"],
                                         index_paths=[str(t.with_suffix(".idx")) for t in tars],
                                         missing_component_behavior="error", random_shuffle=False)
        return jpg, cls

    pipe = read()
    pipe.build()
    jpgs, classes = pipe.run()
    for i in range(len(ix)):
        assert np.array(jpgs[i]).tobytes() == ix.path(i).read_bytes(), i
        assert int(np.array(classes[i]).tobytes()) == ix.labels[i]


KILLED_MIDWAY = """
import os, signal, sys
from gcvit_data import pack
real, members = pack._Tar.member, []

def member(self, name, data):  # SIGKILL (no cleanup runs) at the 19th member: 2 shards done, the 3rd begun
    members.append(name)
    if len(members) == 19:
        self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, name, data)

pack._Tar.member = member
pack.main([sys.argv[1], sys.argv[2], "--shard-size", "16KB", "--quiet"])
"""


def test_killed_pack_leaves_no_output_and_a_rerun_finishes_it(source: Path, packed: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out, staging = tmp_path / "out", tmp_path / ".out.partial"
    killed = subprocess.run([sys.executable, "-c", KILLED_MIDWAY, str(source), str(out)], capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert not out.exists() and not is_pack(out)
    assert sorted(p.name for p in staging.glob("*.json")) == ["plan.json", "train-000000.json",
                                                             "train-000001.json"]
    assert (staging / "train-000002.tar.tmp").stat().st_size > 0  # torn

    written = []
    real = pack_module.write_shard
    monkeypatch.setattr(pack_module, "write_shard", lambda job, stage: written.append(job.name) or
                        real(job, stage))
    assert pack_main([str(source), str(out), "--shard-size", SHARD, "--quiet"]) == 0
    assert written == [p.stem for p in sorted(packed.glob("*.tar"))][2:]  # the finished shards were kept
    assert not staging.exists()
    assert _files(out) == _files(packed)  # byte-identical to an uninterrupted pack

    with pytest.raises(DataError, match="already a pack"):
        pack_main([str(source), str(out), "--quiet"])
    with pytest.raises(DataError, match="is a pack already"):
        pack_main([str(out), str(tmp_path / "again"), "--quiet"])
    (out / "val.samples.npy").unlink()
    with pytest.raises(DataError, match=r"cannot read the val index of the pack .* repack"):
        load_index(out, "val")


def test_rerun_with_another_shard_size_starts_over(source: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real = pack_module.write_shard

    def crash(job, stage):
        real(job, stage)
        raise KeyboardInterrupt

    monkeypatch.setattr(pack_module, "write_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        pack_main([str(source), str(out), "--shard-size", SHARD, "--quiet"])
    monkeypatch.setattr(pack_module, "write_shard", real)
    assert pack_main([str(source), str(out), "--shard-size", "1GB", "--quiet"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]
    assert verify_main([str(out), "--workers", "1", "--quiet"]) == 0


def test_bad_shard_size_is_one_line(source: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--shard-size '1 GQ' is not a size"):
        pack_main([str(source), str(tmp_path / "o"), "--shard-size", "1 GQ"])


def _copy(packed: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "pack"
    copy.mkdir()
    for name, data in _files(packed).items():
        (copy / name).write_bytes(data)
    return copy


def _orphan(packed: Path, tmp_path: Path) -> Path:
    """A copy of the pack whose source folder is gone: every byte read must come from the shards."""
    pack = _copy(packed, tmp_path)
    manifest = json.loads((pack / "pack.json").read_text())
    manifest["source"] = str(tmp_path / "deleted")
    (pack / "pack.json").write_text(json.dumps(manifest))
    return pack


def test_verify_names_shard_offset_and_original_file_of_a_flipped_byte(
        packed: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pack = _copy(packed, tmp_path)
    with pytest.raises(DataError, match="--write-index applies to image folders"):
        verify_main([str(pack), "--write-index", str(tmp_path / "clean")])
    assert verify_main([str(pack), "--workers", "1", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().endswith("checked 24 samples in 7 shards of "
                                                    f"{pack} (train: 18, val: 6): 0 problems")
    split = Split.load(pack, "train")
    i = 7
    row = split.samples[i]
    shard = split.shard_path(int(row["shard"]))
    with open(shard, "r+b") as f:
        f.seek(int(row["offset"]) + int(row["size"]) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))

    assert verify_main([str(pack), "--workers", "2", "--quiet"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[-1].endswith(": 2 problems")
    assert lines[0].startswith(f"{shard}: sha256 ") and "changed after packing" in lines[0]
    original = f"{split.source}/{split.files[i]}"
    assert split.source.endswith("/ds/train")
    assert lines[1].startswith(f"corrupt sample {i} in {shard} at offset {int(row['offset'])} "
                               f"(packed from {original}): crc32c ")

    with pytest.raises(BadImage) as caught:
        PackReader(Split.load(pack, "train"), check=True).read(i)
    assert str(caught.value) == lines[1] and "\n" not in lines[1]
    assert len(PackReader(Split.load(pack, "train")).read(i)) == row["size"]  # unchecked reads stay one pread


def test_verify_catches_a_shard_changed_outside_any_sample(packed: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    pack = _copy(packed, tmp_path)
    shard = pack / "val-000001.tar"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # the end-of-archive padding: no sample's bytes change, the shard's sha256 does
    shard.write_bytes(bytes(data))
    (pack / "val-000000.tar").write_bytes((pack / "val-000000.tar").read_bytes()[:3000])  # truncated
    assert verify_main([str(pack), "--workers", "1", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"{shard}: sha256 " in out and f"{pack / 'val-000000.tar'}: 3000 bytes, pack.json says" in out
    assert "(the shard is truncated)" in out and out.strip().endswith("problems")


def test_pack_cli_runs_as_a_module(source: Path, tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "gcvit_data.pack", str(source), str(tmp_path / "p"),
                          "--splits", "val"], capture_output=True, text=True, check=True)
    assert run.stdout.startswith("packed 6 images (val: 6) into 1 shards") and "pack " in run.stderr


@pytest.mark.parametrize("loader", ["torch", "dali"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_loaders_give_bitwise_the_folder_batches_from_a_pack(source: Path, packed: Path, split: str,
                                                             loader: str, tmp_path: Path) -> None:
    folder = _batches(source, split, workers=0, loader=loader)
    assert len(folder) >= 2
    pack = _orphan(packed, tmp_path)
    runs = [_batches(pack, split, workers=2, loader=loader)]
    if split == "train":  # val passes always start at the beginning
        runs.append(_batches(pack, split, workers=0, resume_after=1, loader=loader))
    for got in runs:
        _assert_same(got, folder)


@pytest.mark.parametrize("split,loader", [("train", "torch"), ("val", "torch"), ("val", "dali")])
def test_val_split_of_a_pack_is_the_val_split_of_its_folder(source: Path, packed: Path, split: str,
                                                            loader: str, tmp_path: Path) -> None:
    pack = _orphan(packed, tmp_path)
    folder = _batches(source, split, workers=0, val_split=0.4, loader=loader)
    got = _batches(pack, split, workers=0, val_split=0.4, loader=loader)
    assert len(folder) >= 1
    _assert_same(got, folder)


def _flip_a_byte_of(pack: Path, split_name: str, i: int) -> tuple[Path, int]:
    """Corrupt sample i inside its shard; returns the shard and the sample's offset."""
    split = Split.load(pack, split_name)
    row = split.samples[i]
    shard = split.shard_path(int(row["shard"]))
    data = bytearray(shard.read_bytes())
    data[int(row["offset"]) + 100] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard, int(row["offset"])


@pytest.mark.parametrize("loader,workers", [("torch", 1), ("dali", 0), ("dali", 2)])
def test_loaders_name_the_corrupt_sample_of_a_pack(packed: Path, tmp_path: Path, loader: str,
                                                   workers: int) -> None:
    pack = _copy(packed, tmp_path)
    shard, at = _flip_a_byte_of(pack, "val", 4)
    with pytest.raises(DataError, match=rf"^data error: corrupt sample 4 in {shard} at offset {at} "
                                        r"\(packed from .*/val/.*\.JPEG\): crc32c .*data\.verify"):
        list(_batches(pack, "val", workers=workers, loader=loader))
    if loader == "torch":
        with pytest.raises(DataError, match="data.index_dir applies to image folders"):
            load_index(pack, "val", index_dir=str(tmp_path))


def test_verify_catches_an_index_that_disagrees_with_the_manifest(packed: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    pack = _copy(packed, tmp_path)
    rows = np.load(pack / "val.samples.npy")
    rows["shard"][0] = 1  # sample 0 claimed by the second shard: it would be read from the wrong file
    np.save(pack / "val.samples.npy", rows)
    assert verify_main([str(pack), "--workers", "1", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"{pack / 'val-000000.tar'}: the index does not place samples 0..3 in this shard" in out


def test_pack_of_a_clean_index_leaves_the_bad_files_out(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    root = write_image_folder(tmp_path / "ds", train_per_class=3, val_per_class=1, num_classes=2)
    bad = root / "train" / "00_circle" / "truncated.JPEG"
    bad.write_bytes((root / "train" / "00_circle" / "train_circle_0000.JPEG").read_bytes()[:300])
    clean = str(tmp_path / "clean")
    assert verify_main([str(root), "--workers", "1", "--quiet", "--write-index", clean]) == 0
    assert pack_main([str(root), str(tmp_path / "pack"), "--index-dir", clean, "--quiet"]) == 0
    split = Split.load(tmp_path / "pack", "train")
    assert len(split) == 6 and "00_circle/truncated.JPEG" not in split.files
    capsys.readouterr()
    assert verify_main([str(tmp_path / "pack"), "--workers", "1", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().endswith("(train: 6, val: 2): 0 problems")

    (root / "val" / "01_square" / "val_square_0000.JPEG").unlink()  # listed in the clean index, now gone
    with pytest.raises(DataError, match=r"cannot stat .*/val/01_square/val_square_0000.JPEG \(No such file"):
        pack_main([str(root), str(tmp_path / "pack2"), "--index-dir", clean, "--quiet"])


@pytest.mark.sample
def test_pack_of_the_real_imagenet_sample(imagenet_sample: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    """1000 real JPEGs (grayscale ones, 68x121 to 2400x1600): the bytes, a clean verify, 32 MB shards."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "train").symlink_to(imagenet_sample)
    assert pack_main([str(root), str(tmp_path / "pack"), "--splits", "train", "--shard-size", "32MB",
                      "--quiet"]) == 0
    ix, split = load_index(root, "train"), load_index(tmp_path / "pack", "train")
    assert len(split) == len(ix) == 1000 and split.labels == ix.labels and split.labels[-1] == 999
    assert all(split.encoded(i) == ix.path(i).read_bytes() for i in range(len(ix)))
    manifest = json.loads((tmp_path / "pack" / "pack.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) == 4 and sum(s["samples"] for s in shards) == 1000
    for shard, following in zip(shards, shards[1:]):  # full: the next image would not have fitted
        assert shard["bytes"] <= 32_000_000 < shard["bytes"] + 3 * 512 + split.reader.split.samples[
            following["first"]]["size"]
    capsys.readouterr()
    assert verify_main([str(tmp_path / "pack"), "--workers", "2", "--quiet"]) == 0


def test_png_sources_become_png_members(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "ds", train_per_class=2, val_per_class=1, num_classes=2)
    jpeg = root / "train" / "01_square" / "train_square_0000.JPEG"
    Image.open(jpeg).save(jpeg.with_suffix(".png"))
    jpeg.unlink()
    assert pack_main([str(root), str(tmp_path / "pack"), "--quiet"]) == 0
    members = subprocess.run(["tar", "-tf", str(tmp_path / "pack" / "train-000000.tar")], capture_output=True,
                             text=True, check=True).stdout.split()
    assert members[4:6] == ["0000000002.png", "0000000002.cls"]
    assert (tmp_path / "pack" / "train-000000.idx").read_text().splitlines()[3].startswith("png ")
    assert load_index(tmp_path / "pack", "train").encoded(2) == jpeg.with_suffix(".png").read_bytes()


def test_dali_names_the_original_file_of_a_packed_image_it_cannot_decode(tmp_path: Path) -> None:
    """Packed as it was (its crc32c holds), a JPEG whose data ends after the scan header: DALI fails,
    and the loader names the file the sample was packed from."""
    root = write_image_folder(tmp_path / "src", train_per_class=4, val_per_class=1, num_classes=2)
    victim = sorted((root / "train").rglob("*.JPEG"))[2]
    raw = victim.read_bytes()
    victim.write_bytes(raw[:raw.index(b"\xff\xda") + 12])
    pack_module.pack(root, tmp_path / "pack", shard_size=1 << 20, progress=False)
    with pytest.raises(DataError) as err:
        _batches(tmp_path / "pack", "train", workers=2, loader="dali")
    msg = str(err.value)
    assert f"cannot decode {victim}" in msg and "\n" not in msg
