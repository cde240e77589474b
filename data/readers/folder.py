"""ImageFolder reader: ROOT/<split>/<wnid>/*.JPEG as an Index, classes in sorted-wnid order, cached on disk.

A cache file is reused while its fingerprint (the class folders' names and mtimes, which change whenever a
file is added or removed) matches, so 1.28M files are listed once, not at every start. A clean index
written by `python -m gcvit_data.verify --write-index` (data.index_dir) is used as is.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from gcvit_data.index import IMAGE_EXTENSIONS, DataError, Index

FORMAT = "gcvit-index v1"


def detect(root: Path) -> bool:
    """Any directory is read as an image folder (the other sources are asked first)."""
    return root.is_dir()


def write_index(index: Index, path: Path, fingerprint: str = "") -> None:
    """Save as a small header line plus one `label<TAB>relative path` line per image (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "root": str(index.root), "classes": index.classes, "fingerprint": fingerprint}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(header) + "\n")
        f.writelines(f"{y}\t{p}\n" for y, p in zip(index.labels, index.files))
    os.replace(tmp, path)


def read_index(path: Path) -> tuple[Index, str]:
    """Load a written index and its fingerprint."""
    with open(path) as f:
        header = json.loads(f.readline())
        if header.get("format") != FORMAT:
            raise DataError(f"{path} is not a {FORMAT} file; rebuild it with python -m gcvit_data.verify")
        labels, files = [], []
        for line in f:
            y, p = line.rstrip("\n").split("\t", 1)
            labels.append(int(y))
            files.append(p)
    return Index(Path(header["root"]), header["classes"], files, labels), header["fingerprint"]


def list_classes(split_dir: Path) -> list[str]:
    """Sorted class folder names of a split, with one-line errors for a missing or empty split."""
    if not split_dir.is_dir():
        hint = ("; or, with no val split, hold out part of ROOT/train: data.val_split=0.1"
                if split_dir.name == "val" and (split_dir.parent / "train").is_dir() else "")
        raise DataError(f"{split_dir} does not exist; expected ImageFolder layout ROOT/train/<wnid>/*.JPEG "
                        f"and ROOT/val/<wnid>/*.JPEG (python -m gcvit_data.prepare imagenet builds it){hint}")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} has no class folders; expected {split_dir}/<wnid>/*.JPEG")
    return classes


def fingerprint(split_dir: Path, classes: list[str]) -> str:
    """Changes whenever a class folder is added, removed, or has a file added or removed."""
    h = hashlib.sha1()
    for c in classes:
        h.update(f"{c}:{os.stat(split_dir / c).st_mtime_ns};".encode())
    return h.hexdigest()


def scan(split_dir: Path, classes: list[str]) -> Index:
    """List every image of a split; a class folder without images is an error."""
    files, labels = [], []
    known = set(classes)
    for c in list_classes(split_dir):
        if c not in known:
            raise DataError(f"{split_dir / c} is a class that the train split does not have; "
                            "the val folders must use the train split's wnids")
    for label, c in enumerate(classes):
        d = split_dir / c
        if not d.is_dir():
            continue  # a val split may lack a class; labels still follow the train classes
        names = sorted(e.name for e in os.scandir(d) if e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise DataError(f"class folder {d} holds no images (*.JPEG/*.jpg/*.png); remove it or fill it")
        files += [f"{c}/{n}" for n in names]
        labels += [label] * len(names)
    return Index(split_dir, classes, files, labels)


def cache_dir_for(root: Path, index_cache: str | None) -> Path:
    """Cache location: index_cache, else ROOT/.gcvit-index, else ~/.cache when ROOT is read-only."""
    if index_cache:
        return Path(index_cache)
    if os.access(root, os.W_OK):
        return root / ".gcvit-index"
    key = hashlib.sha1(str(root).encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "gcvit-train" / "index" / key


def load(root: Path, split: str, *, index_cache: str | None = None, index_dir: str | None = None) -> Index:
    """The index of ROOT/<split>: from index_dir (a clean index), a valid cache, or a fresh scan."""
    if index_dir:
        path = Path(index_dir) / f"{split}.tsv"
        if not path.is_file():
            raise DataError(f"{path} does not exist; write it with python -m gcvit_data.verify {root} "
                            f"--write-index {index_dir}")
        index = read_index(path)[0]
        if index.root != root / split:
            raise DataError(f"{path} indexes {index.root}, not {root / split}; point data.index_dir at the "
                            "index written for this data.root")
        return index
    if not (root / "train").is_dir() and next(root.glob("*.tar"), None) is not None:
        raise DataError(f"data.root {root} holds .tar files but no train/ folder, _info.json or pack.json; "
                        "WebDataset shards are read with the _info.json listing them (timm's, as "
                        "downloaded), a pack with its pack.json")
    classes = list_classes(root / "train")
    split_dir = root / split
    if split != "train":
        list_classes(split_dir)
    fp = fingerprint(split_dir, [c for c in classes if (split_dir / c).is_dir()])
    cache = cache_dir_for(root, index_cache) / f"{split}.tsv"
    if cache.is_file():
        index, cached_fp = read_index(cache)
        if cached_fp == fp and index.root == split_dir and index.classes == classes:
            return index
    index = scan(split_dir, classes)
    with contextlib.suppress(OSError):  # an unwritable cache only costs the next start a rescan
        write_index(index, cache, fp)
    return index
