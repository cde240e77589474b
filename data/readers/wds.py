"""WebDataset reader: timm's shards (timm/imagenet-1k-wds) read in place, one pread per image.

ROOT/_info.json (or info.json), as timm's reader_wds reads it, lists each split's shards ({"splits": {"train":
{"filenames": [...], "num_samples": N, "shard_lengths": [...]}, "validation": {...}}}); each shard is an
uncompressed tar whose samples are the consecutive members <key>.jpg (or .jpeg/.png/.webp) and <key>.cls
(the class index; a <key>.json is ignored). data.root=ROOT reads the tars as they are: the random-access
index (shard, offset, size, label of each image) is built once by walking the tar headers with tarfile,
which gives each member's data offset (nothing copied, nothing extracted), checked against shard_lengths
and num_samples, and kept in ROOT/.gcvit-index, or in data.index_dir when ROOT is read-only (named by a
hash of ROOT there). It is rebuilt when a shard's name or size changes. Sample ids follow the shards' order
and the members' order within each; the val split is the one timm calls "validation". The class count is
num_classes(); the classes are named by ImageNet-1K's sorted wnids (timm's list) when the shards are timm's
ImageNet-1K (1000 classes, "imagenet" in their names: timm's labels are the sorted-wnid positions), so a
checkpoint trained on the folder keeps its head; other shards' classes are named "0".."n-1".
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pkgutil
import sys
import tarfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from gcvit_data.index import BadImage, DataError, ShardedIndex
from gcvit_data.shards import ShardReader

INFO_NAMES = ("_info.json", "info.json")  # timm's reader_wds takes either, in this order
FORMAT = "gcvit-wds-index v1"
SPLITS = {"train": ("train",), "val": ("validation", "val")}  # our split: timm's names for it, in order
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
WALK_THREADS = 16
ROW = np.dtype([("shard", "<u4"), ("offset", "<u8"), ("size", "<u4"), ("label", "<i8")])


def info_path(root: Path) -> Path:
    """ROOT/_info.json, else ROOT/info.json (the first that exists; the first name when neither does)."""
    return next((root / n for n in INFO_NAMES if (root / n).is_file()), root / INFO_NAMES[0])


def detect(root: Path) -> bool:
    """A folder with timm's _info.json (or info.json)."""
    return info_path(root).is_file()


def read_info(root: Path) -> dict[str, Any]:
    """_info.json, with a one-line error when it is not timm's split listing."""
    path = info_path(root)
    try:
        info = json.loads(path.read_text())
        info["splits"].items()
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise DataError(f"cannot read {path} as timm's WebDataset info ({type(e).__name__}: {e}); "
                        'it must hold {"splits": {"train": {"filenames": [...]}, ...}}') from None
    return info


def split_info(root: Path, split: str) -> dict[str, Any]:
    """The _info.json entry of our `split` (train | val): filenames, and where given num_samples and
    shard_lengths."""
    splits = read_info(root)["splits"]
    name = next((n for n in SPLITS.get(split, (split,)) if n in splits), None)
    if name is None:
        wanted = " or ".join(SPLITS.get(split, (split,)))
        raise DataError(f"{info_path(root)} lists no {wanted} split (it has {', '.join(splits)}); "
                        "data.val_split=0.1 holds out part of train instead")
    return splits[name]


def class_names(n: int, shards: list[str]) -> list[str]:
    """ImageNet-1K's sorted wnids (shipped with timm) for timm's ImageNet-1K shards, else "0".."n-1"."""
    if n == 1000 and shards and "imagenet" in shards[0].lower():
        return pkgutil.get_data("timm.data", "_info/imagenet_synsets.txt").decode().split()
    return [str(c) for c in range(n)]


def _key_ext(name: str) -> tuple[str, str]:
    """WebDataset's grouping: the key is the path up to the first dot of the base name."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return f"{head}/{stem}" if head else stem, ext.lower()


def _label(path: Path, member: str, raw: bytes) -> int:
    try:
        label = int(raw)
    except ValueError:
        raise DataError(f"{path}: member {member} holds {raw[:40]!r}, not a class index; rewrite that sample "
                        "or drop the shard from _info.json") from None
    if label < 0:
        raise DataError(f"{path}: member {member} holds label {label}; training needs labels 0..n-1 (timm "
                        "writes -1 for the unlabelled test split: read the train and validation shards only)")
    return label


def walk(path: Path, k: int) -> tuple[list[tuple[int, int, int, int]], list[str]]:
    """(shard k, offset, size, label) of each sample of one tar and its image member's name."""
    rows, names, found = [], [], {}
    size = path.stat().st_size

    def finish() -> None:
        if not found:
            return
        if "image" not in found or "cls" not in found:
            missing = ".cls" if "image" in found else f"image (.{'/.'.join(IMAGE_EXTS)})"
            raise DataError(f"{path}: sample {found['key']} has no {missing} member; rewrite that shard")
        member, offset, n = found["image"]
        rows.append((k, offset, n, found["cls"]))
        names.append(f"{path.name}/{member}")
        found.clear()

    with open(path, "rb") as f:
        try:  # not closed: closing a TarFile given a fileobj leaves the file open anyway
            tar = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = _key_ext(m.name)
                if found and key != found["key"]:
                    finish()
                found["key"] = key
                if m.offset_data + m.size > size:
                    raise DataError(f"{path}: member {m.name} runs past the end of the file (the shard is "
                                    "truncated); restore it")
                if ext in IMAGE_EXTS:
                    found["image"] = (m.name, m.offset_data, m.size)
                elif ext == "cls":
                    found["cls"] = _label(path, m.name, tar.extractfile(m).read())
        except tarfile.TarError as e:
            raise DataError(f"{path} is not a readable uncompressed tar ({e}); restore that shard") from None
        finish()
    return rows, names


def index_path(root: Path, split: str, index_dir: str | None) -> Path:
    """ROOT/.gcvit-index/<split>.wds-index.npz; in data.index_dir, which several roots may share, the name
    carries a hash of the root."""
    if not index_dir:
        return root / ".gcvit-index" / f"{split}.wds-index.npz"
    key = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    return Path(index_dir).expanduser().resolve() / f"{split}-{key}.wds-index.npz"


def _shards_now(root: Path, names: list[str]) -> list[list[Any]]:
    try:
        return [[n, (root / n).stat().st_size] for n in names]
    except OSError as e:
        raise DataError(f"{e.filename} is listed in {info_path(root)} but cannot be read ({e.strerror}); "
                        "download the missing shards") from None


def _read(path: Path, shards: list[list[Any]]) -> tuple[dict, np.ndarray, list[str]] | None:
    """A stored index that describes exactly these shards (name and size), else None."""
    with contextlib.suppress(OSError, ValueError, KeyError, zipfile.BadZipFile), np.load(path) as z:
        header = json.loads(bytes(z["header"]).decode())
        if header["format"] == FORMAT and header["shards"] == shards:
            rows = z["rows"]
            return header, rows, bytes(z["files"]).decode().split("\n") if len(rows) else []
    return None


def check_counts(root: Path, split: str, entry: dict[str, Any], found: list[int]) -> None:
    """Each shard holds the samples _info.json's shard_lengths gives it, the split its num_samples: a shard
    cut at a sample boundary is still a valid tar, and only these counts show it."""
    where = info_path(root)
    for name, n, listed in zip(entry["filenames"], found, entry.get("shard_lengths") or []):
        if n != listed:
            raise DataError(f"{root / name} holds {n} samples but {where.name} lists {listed} for it "
                            "(shard_lengths); the shard is cut short or is another one: download it again")
    listed = entry.get("num_samples")
    if isinstance(listed, int) and listed != sum(found):
        raise DataError(f"the {split} shards of {root} hold {sum(found)} samples but {where.name} says "
                        f"num_samples {listed}; a shard is incomplete or the listing is stale: download the "
                        "split again")


def build(root: Path, split: str, index_dir: str | None = None) -> tuple[dict, np.ndarray, list[str]]:
    """The stored index of a split: read when current, else built (one process per folder; others wait)."""
    entry = split_info(root, split)
    names = list(entry["filenames"])
    shards = _shards_now(root, names)
    path = index_path(root, split, index_dir)
    if (found := _read(path, shards)) is not None:
        return found
    if not index_dir and not os.access(root, os.W_OK):
        raise DataError(f"data.root {root} is read-only and its {split} shards have no index yet; set "
                        "data.index_dir to a writable folder (the index is built there once)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        # one builder, the others then read what it wrote; where the filesystem has no flock (Lustre
        # mounted without it) each builds the same index and the last atomic rename wins
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (found := _read(path, shards)) is not None:
            return found
        start, rows, files, counts = time.perf_counter(), [], [], []
        print(f"{root}: indexing the {split} split's {len(names)} WebDataset shards once, into {path}",
              file=sys.stderr, flush=True)
        # the headers are many small reads: on a cluster filesystem their round trips overlap across shards
        with ThreadPoolExecutor(WALK_THREADS) as pool:
            for r, f in pool.map(walk, [root / n for n in names], range(len(names))):
                rows += r
                files += f
                counts.append(len(r))
        check_counts(root, split, entry, counts)
        took = time.perf_counter() - start
        print(f"{root}: indexed {len(rows)} {split} images in {took:.1f} s", file=sys.stderr, flush=True)
        header = {"format": FORMAT, "root": str(root), "split": split, "shards": shards,
                  "num_classes": max((r[3] for r in rows), default=-1) + 1}
        arrays = {"header": np.frombuffer(json.dumps(header).encode(), np.uint8),
                  "rows": np.array(rows, ROW), "files": np.frombuffer("\n".join(files).encode(), np.uint8)}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    return header, arrays["rows"], files


class WdsReader(ShardReader):
    """A split's images by sample id: one pread from its shard, whose length is checked."""

    def __init__(self, root: Path, names: list[str], rows: np.ndarray, files: list[str]) -> None:
        super().__init__([root / n for n in names], f"restore that shard of {root}")
        self.rows, self.files = rows, files

    def read(self, i: int) -> bytes:
        row = self.rows[i]
        size, k = int(row["size"]), int(row["shard"])
        data = self.pread(k, size, int(row["offset"]))
        if len(data) != size:
            raise BadImage(f"{self.paths[k].parent / self.files[i]}: {len(data)} of its {size} bytes (the "
                           "shard is truncated); restore that shard")
        return data


def num_classes(root: Path, split: str, seen: int, index_dir: str | None) -> tuple[int, str]:
    """How many classes, and what says so: _info.json's num_classes; else the train split's largest label
    + 1 (`seen` for train; for val its index is built when the train shards are there); else, for timm's
    ImageNet-1K validation shards alone, 1000; else the val split's largest label + 1 (`seen`)."""
    info = read_info(root)
    if isinstance(info.get("num_classes"), int):
        n = info["num_classes"]
        return n, f"{info_path(root).name}'s num_classes is {n}"
    if split == "train":
        return seen, f"the train shards have {seen} classes"
    if any((root / name).is_file() for name in info["splits"].get("train", {}).get("filenames", [])):
        n = build(root, "train", index_dir)[0]["num_classes"]
        return n, f"the train shards have {n} classes"
    if seen <= 1000 and "imagenet" in split_info(root, split)["filenames"][0].lower():
        return 1000, "ImageNet-1K has 1000 classes"
    return seen, f"its labels name {seen} classes"


def load(root: Path, split: str, *, index_cache: str | None = None,
         index_dir: str | None = None) -> ShardedIndex:
    """The index of `split`, its shards open; labels must be classes of the set (num_classes())."""
    header, rows, files = build(root, split, index_dir)
    n, source = num_classes(root, split, header["num_classes"], index_dir)
    if header["num_classes"] > n:
        i = int(np.argmax(rows["label"]))
        raise DataError(f"{root / files[i].rsplit('.', 1)[0]}.cls is {int(rows['label'][i])}, but {source}; "
                        "rewrite that sample")
    names = [s[0] for s in header["shards"]]
    reader = WdsReader(root, names, rows, files)
    reader.open_all()
    return ShardedIndex(root, class_names(n, names), files, rows["label"].tolist(), reader)


def stage_plan(root: Path) -> tuple[str, dict[str, str | None]]:
    """What data.cache_dir copies: the key naming the copy (new shards, new copy); no checksums to check."""
    info = info_path(root).read_bytes()
    names = [n for split in read_info(root)["splits"].values() for n in split["filenames"]]
    key = hashlib.sha256(info + json.dumps(_shards_now(root, names)).encode()).hexdigest()[:16]
    return key, dict.fromkeys(names)
