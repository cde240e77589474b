"""data.cache_dir: a pack copied once per node under a lock, every shard's sha256 checked, resumed after a
kill, reused later; training reads the copy."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gcvit_data.config import DataConfig
from gcvit_data.demo import write_image_folder
from gcvit_data.index import DataError
from gcvit_data.pack import pack
from gcvit_data.readers import load_index
from gcvit_data.resolve import resolve_data
from gcvit_data.staging import DONE, stage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_image_folder(tmp_path_factory.mktemp("jpegs"), train_per_class=6, val_per_class=2,
                              num_classes=3, sizes=(40, 90), seed=3)
    out = tmp_path_factory.mktemp("packs") / "pack"
    pack(root, out, shard_size=40_000, progress=False)  # several shards per split
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and not p.name.startswith(".")}


def test_a_copy_is_made_once_then_reused(packed: Path, tmp_path: Path, capsys) -> None:
    dest = stage(packed, tmp_path / "cache")
    assert dest.parent == (tmp_path / "cache").resolve() and (dest / DONE).is_file()
    assert _files(dest) == _files(packed) and len([n for n in _files(dest) if n.endswith(".tar")]) > 2
    assert "sha256 of every shard verified" in capsys.readouterr().out
    mtimes = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    assert stage(packed, tmp_path / "cache") == dest
    assert "staged earlier" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == mtimes  # nothing copied again
    assert load_index(dest, "train").encoded(5) == load_index(packed, "train").encoded(5)


def test_processes_of_a_node_copy_once_and_all_get_the_copy(packed: Path, tmp_path: Path) -> None:
    code = f"from gcvit_data.staging import stage; print(stage({str(packed)!r}, {str(tmp_path / 'c')!r}))"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum("data.cache_dir: staged " in o for o in outs) == 1  # one copier; the others waited for it
    assert len({o.strip().splitlines()[-1] for o in outs}) == 1
    assert _files(Path(outs[0].strip().splitlines()[-1])) == _files(packed)


def test_a_killed_copy_is_resumed_and_a_partial_file_never_used(packed: Path, tmp_path: Path) -> None:
    dest = stage(packed, tmp_path / "cache")
    shard = next(n for n in _files(packed) if n.endswith(".tar"))
    for p in dest.iterdir():  # back to the moment of the kill: one shard finished, nothing marked done
        if p.name != shard:
            p.unlink()
    (dest / f".{shard}.partial").write_bytes(b"half")  # a file being copied when it happened
    assert stage(packed, tmp_path / "cache") == dest
    assert _files(dest) == _files(packed)


def test_a_shard_that_is_not_the_packed_one_is_refused(packed: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for name, data in _files(packed).items():
        (bad / name).write_bytes(data)
    shard = sorted(n for n in _files(bad) if n.endswith(".tar"))[1]
    data = bytearray((bad / shard).read_bytes())
    data[-700] ^= 0xFF
    (bad / shard).write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{shard} does not match the sha256 in .*pack.json"):
        stage(bad, tmp_path / "cache")
    [dest] = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # the copy it began
    assert not (dest / shard).exists() and not (dest / DONE).exists()


def test_too_little_space_is_one_line(packed: Path, tmp_path: Path, monkeypatch) -> None:
    import gcvit_data.staging as staging

    monkeypatch.setattr(staging.shutil, "disk_usage", lambda _: type("U", (), {"free": 1000})())
    with pytest.raises(DataError, match=r"has 0.0 GB free but the pack .* needs 0.0 GB more"):
        stage(packed, tmp_path / "cache")


def test_training_reads_the_local_copy(packed: Path, tmp_path: Path) -> None:
    data = replace(DataConfig(), root=str(packed), cache_dir=str(tmp_path / "nvme"))
    rank0 = dict(is_main=True, local_rank=0, broadcast=lambda obj: obj)  # one process
    assert resolve_data(data, **rank0).root == str(stage(packed, tmp_path / "nvme"))
    data = replace(data, root=str(packed.parent))  # a folder, not a pack
    with pytest.raises(SystemExit, match="data.cache_dir=.* stages packs and WebDataset shards only"):
        resolve_data(data, **rank0)
