"""ImageNet's raw tars straight into a pack: `python -m gcvit_data.prepare imagenet ... --format shards`.

The train tar (1000 per-class tars inside one, uncompressed) and the val tar are indexed in place: tarfile
reads each member's header and says where its bytes start, and the shards are written from there with one
pread per image, so the 1.28M images are never extracted as files. The samples are in the order that
gcvit_data.index gives the extracted folders (sorted wnids, then sorted file names), so the pack is
byte-identical to `prepare --format folder` followed by `python -m gcvit_data.pack` (tested); a sample's
original file is named as TAR/<wnid>/<file> in errors.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from gcvit_data.image_header import check_bytes
from gcvit_data.imagenet import check_val_complete, check_val_labels, class_of, val_class
from gcvit_data.index import IMAGE_EXTENSIONS, DataError, Index
from gcvit_data.pack import ShardJob, check_out, cut, write_pack

Member = tuple[str, int, int]  # base name, offset of its bytes in the outer file, size
CHECK_CHUNK = 256  # images per task of the --check pool


def members(f: BinaryIO, path: Path, start: int = 0, end: int | None = None) -> Iterator[Member]:
    """The regular files of the uncompressed tar in `f` that begins at `start` (a tar inside a tar ends
    at `end`); the caller must not move `f` while it iterates."""
    f.seek(start)
    try:  # not closed: closing a TarFile given a fileobj leaves the file open anyway
        tar = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115
    except tarfile.ReadError as e:
        raise DataError(f"{path} is not an uncompressed tar ({e}); --format shards reads the images in "
                        "place: decompress it first, or use --format folder") from None
    for m in tar:
        if end is not None and m.offset_data + m.size > end:
            raise DataError(f"{path}: the tar at byte {start} runs past its end; is {path} complete?")
        if m.isfile():
            yield os.path.basename(m.name), m.offset_data, m.size


def _images(found: Iterator[Member]) -> list[Member]:
    """The images among a class's files, sorted by name (gcvit_data.index.scan's order)."""
    return sorted(m for m in found if m[0].lower().endswith(IMAGE_EXTENSIONS))


def train_members(train_tar: Path) -> dict[str, list[Member]]:
    """{wnid: its images} from the tar of per-class tars."""
    by_class = {}
    with open(train_tar, "rb") as f:
        for name, offset, size in tqdm(list(members(f, train_tar)), desc="index train classes", unit="class",
                                       file=sys.stderr):
            images = _images(members(f, train_tar, offset, offset + size))
            if not images:
                raise DataError(f"{name} inside {train_tar} holds no images")
            by_class[class_of(name, train_tar)] = images
    if not by_class:
        raise DataError(f"{train_tar} holds no per-class tars")
    return by_class


def val_members(val: Path, labels: dict[str, str], wnids: list[str], source: Path) -> dict[str, list[Member]]:
    """{wnid: its images} of the flat val tar (offsets in it) or folder (offset 0 in each file)."""
    check_val_labels(labels, wnids, source)
    if val.is_dir():
        found = [(p.name, 0, p.stat().st_size) for p in sorted(val.iterdir()) if p.is_file()]
    else:
        with open(val, "rb") as f:
            found = list(members(f, val))
    by_class: dict[str, list[Member]] = {}
    for m in found:
        by_class.setdefault(val_class(m[0], labels, val, source), []).append(m)
    check_val_complete(labels, {m[0] for m in found}, val, source)
    return {w: _images(iter(ms)) for w, ms in by_class.items()}


def _check_chunk(items: list[tuple[str, int, int, str]]) -> list[tuple[str, str]]:
    """(reason, name) of each image among `items` (file, offset, size, name) that gcvit_data.verify rejects;
    each file is opened once."""
    bad, fds = [], {}
    try:
        for source, offset, size, name in items:
            if source not in fds:
                fds[source] = os.open(source, os.O_RDONLY)
            reason = check_bytes(os.pread(fds[source], size, offset), Path(name).suffix)
            if reason:
                bad.append((reason, name))
    finally:
        for fd in fds.values():
            os.close(fd)
    return bad


def leave_out_bad(splits: dict[str, tuple[Path, dict[str, list[Member]]]], workers: int,
                  progress: bool) -> list[tuple[str, str]]:
    """Decode every image as gcvit_data.verify does and drop the ones it rejects from `splits` ({split:
    (its tar or flat folder, {wnid: images})}); returns (reason, SOURCE/<wnid>/<file>) of each."""
    items = [(str(src / m[0]) if src.is_dir() else str(src), m[1], m[2], f"{src}/{w}/{m[0]}")
             for src, by_class in splits.values() for w, ms in by_class.items() for m in ms]
    chunks = [items[k:k + CHECK_CHUNK] for k in range(0, len(items), CHECK_CHUNK)]
    bad = []
    with tqdm(total=len(items), desc="check images", unit="img", disable=not progress,
              file=sys.stderr) as bar:
        if workers > 1 and len(chunks) > 1:
            with mp.get_context("spawn").Pool(min(workers, len(chunks))) as pool:
                for chunk, found in zip(chunks, pool.imap(_check_chunk, chunks)):
                    bad += found
                    bar.update(len(chunk))
        else:
            for chunk in chunks:
                bad += _check_chunk(chunk)
                bar.update(len(chunk))
    dropped = {name for _, name in bad}
    for src, by_class in splits.values():
        for w, ms in by_class.items():
            ms[:] = [m for m in ms if f"{src}/{w}/{m[0]}" not in dropped]
    return sorted(bad, key=lambda b: b[1])


def _split(name: str, by_class: dict[str, list[Member]], wnids: list[str], tar: Path | None,
           folder: Path | None, shard_size: int) -> tuple[Index, list[ShardJob]]:
    """The index and shard jobs of one split: images read from `tar` at their offsets, or `folder`'s files."""
    files, labels, sizes, offsets = [], [], [], []
    for label, w in enumerate(wnids):
        for member, offset, size in by_class.get(w, []):
            files.append(f"{w}/{member}")
            labels.append(label)
            sizes.append(size)
            offsets.append(offset)
    paths = [str(folder / f.split("/", 1)[1]) for f in files] if folder else files
    jobs = cut(name, paths, labels, sizes, shard_size, str(tar) if tar else None, offsets if tar else None)
    return Index(tar or folder, wnids, files, labels), jobs


def prepare_pack(train_tar: Path, val: Path, labels: dict[str, str], source: Path, out: Path, *,
                 shard_size: int, workers: int = 1, check: bool = False,
                 progress: bool = True) -> tuple[dict, list[tuple[str, str]]]:
    """Write the pack of ImageNet's train and val images straight from the tars into OUT; with `check`,
    without the images gcvit_data.verify rejects. Returns the manifest and (reason, image) of those."""
    train_tar, val, out = train_tar.resolve(), val.resolve(), out.expanduser().resolve()
    check_out(out)
    train = train_members(train_tar)
    wnids = sorted(train)
    val_by_class = val_members(val, labels, wnids, source)
    bad = leave_out_bad({"train": (train_tar, train), "val": (val, val_by_class)}, workers,
                        progress) if check else []
    val_tar, val_folder = (None, val) if val.is_dir() else (val, None)
    train_ix, train_jobs = _split("train", train, wnids, train_tar, None, shard_size)
    val_ix, val_jobs = _split("val", val_by_class, wnids, val_tar, val_folder, shard_size)
    manifest = write_pack(out, str(train_tar), {"train": train_ix, "val": val_ix}, train_jobs + val_jobs,
                          shard_size, workers=workers, progress=progress,
                          split_sources={"train": str(train_tar), "val": str(val)})
    return manifest, bad
