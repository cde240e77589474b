"""Pack an ImageFolder into few large tar shards with a random-access index (format: data/shards.py).

    python -m gcvit_data.pack ROOT OUT [--shard-size 1GB] [--workers N] [--splits train val] [--index-dir DIR]

The original image bytes are stored unchanged, in index.py's sample order, so training on OUT gives the
batches that training on ROOT gives. Atomic: the pack is built in OUT's hidden sibling `.OUT.partial` and
renamed to OUT when complete; a crashed run leaves no OUT, and running the same command again keeps the
shards it had finished and writes the rest.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from gcvit_data.index import DataError, Index
from gcvit_data.readers import load_index
from gcvit_data.shards import (
    CHECKSUM,
    FORMAT,
    MANIFEST,
    SAMPLE_DTYPE,
    crc32c,
    is_pack,
    member_key,
    shard_name,
)

BLOCK = tarfile.BLOCKSIZE
STAT_THREADS = 32
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'1GB', '512MiB', '800000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise DataError(f"--shard-size {text!r} is not a size; write e.g. 1GB, 512MB or 500MiB")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def padded(n: int) -> int:
    """Bytes that n bytes of member data occupy in a tar."""
    return -(-n // BLOCK) * BLOCK


def member_ext(path: str) -> str:
    """WebDataset extension of an image member: jpg for JPEGs, png for PNGs."""
    return "png" if path.lower().endswith(".png") else "jpg"


@dataclass
class ShardJob:
    """One shard to write: a run of consecutive sample indices of one split."""

    split: str
    k: int  # shard number within the split
    first: int  # sample index of its first sample
    paths: list[str]  # absolute source files (with `tar`: the member names)
    labels: list[int]
    sizes: list[int]  # source file sizes at planning time (part of the plan a rerun must match)
    tar: str | None = None  # an uncompressed tar holding the images at `offsets` (prepare --format shards)
    offsets: list[int] | None = None  # where each image's bytes start in `tar`

    @property
    def name(self) -> str:
        return shard_name(self.split, self.k)

    @property
    def bytes(self) -> int:
        """The size its tar will have."""
        return sum(3 * BLOCK + padded(size) for size in self.sizes) + 2 * BLOCK


def plan(indices: dict[str, Index], shard_size: int) -> list[ShardJob]:
    """Cut each split's files, in index order, into shards of at most shard_size bytes (>= 1 sample)."""
    jobs = []
    for split, ix in indices.items():
        paths = [str(ix.path(i)) for i in range(len(ix))]
        with ThreadPoolExecutor(STAT_THREADS) as pool:  # a metadata server answers many stats at once
            sizes = list(pool.map(_size, paths, [ix.root.parent] * len(paths)))
        jobs += cut(split, paths, ix.labels, sizes, shard_size)
    return jobs


def cut(split: str, paths: list[str], labels: list[int], sizes: list[int], shard_size: int,
        tar: str | None = None, offsets: list[int] | None = None) -> list[ShardJob]:
    """One split's samples, in order, as shards of at most shard_size bytes (>= 1 sample)."""
    jobs: list[ShardJob] = []
    job, used = None, 0
    for i, size in enumerate(sizes):
        need = 3 * BLOCK + padded(size)  # .jpg header + data, .cls header + data
        if job is None or used + need + 2 * BLOCK > shard_size:  # + the end-of-archive blocks
            job, used = ShardJob(split, len(jobs), i, [], [], [], tar, [] if tar else None), 0
            jobs.append(job)
        job.paths.append(paths[i])
        job.labels.append(labels[i])
        job.sizes.append(size)
        if tar:
            job.offsets.append(offsets[i])
        used += need
    return jobs


def _size(path: str, root: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError as e:
        raise DataError(f"cannot stat {path} ({e.strerror}); run python -m gcvit_data.verify {root} and pack "
                        "its clean index (--index-dir)") from None


class _Tar:
    """A tar written member by member, tracking the position and sha256 of everything written."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.pos, self.sha = f, 0, hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.pos += len(data)

    def member(self, name: str, data: bytes) -> int:
        """Append a regular-file member (fixed owner and mtime: same input, same bytes); its data offset."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self.write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
        offset = self.pos
        self.write(data + b"\0" * (padded(len(data)) - len(data)))
        return offset

    def finish(self) -> None:
        """The two end-of-archive blocks (no padding to 10 KiB records: readers need none); fsync."""
        self.write(b"\0" * (2 * BLOCK))
        self.f.flush()
        os.fsync(self.f.fileno())


def write_shard(job: ShardJob, staging: Path) -> dict:
    """Write job's tar and DALI .idx into staging; the record (a .json written last) marks it done."""
    tmp = staging / f"{job.name}.tar.tmp"
    offsets, sizes, crcs, idx_lines = [], [], [], []
    source = os.open(job.tar, os.O_RDONLY) if job.tar else None  # one open for all its images
    with open(tmp, "wb") as f:
        tar = _Tar(f)
        for n, (path, label) in enumerate(zip(job.paths, job.labels)):
            data = _source_bytes(job, n, source)
            key, ext = member_key(job.first + n), member_ext(path)
            cls = str(label).encode()
            offset = tar.member(f"{key}.{ext}", data)
            cls_offset = tar.member(f"{key}.cls", cls)
            offsets.append(offset)
            sizes.append(len(data))
            crcs.append(crc32c(data))
            idx_lines.append(f"{ext} {offset} {len(data)} {key}.{ext} "
                             f"cls {cls_offset} {len(cls)} {key}.cls\n")
        tar.finish()
    if source is not None:
        os.close(source)
    os.replace(tmp, staging / f"{job.name}.tar")
    _write_atomic(staging / f"{job.name}.idx", f"v1.2 {len(idx_lines)}\n" + "".join(idx_lines))
    record = {"name": job.name, "samples": len(job.paths), "first": job.first, "bytes": tar.pos,
              "sha256": tar.sha.hexdigest(), "offsets": offsets, "sizes": sizes, "crc32c": crcs}
    _write_atomic(staging / f"{job.name}.json", json.dumps(record))
    return record


def _source_bytes(job: ShardJob, n: int, tar_fd: int | None) -> bytes:
    """The bytes of the job's n-th image: its whole file, or one pread from the source tar."""
    if tar_fd is None:
        with open(job.paths[n], "rb") as src:
            return src.read()
    data = os.pread(tar_fd, job.sizes[n], job.offsets[n])
    if len(data) != job.sizes[n]:
        raise OSError(f"{job.tar} ends inside {job.paths[n]}: the tar is truncated")
    return data


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _finished(job: ShardJob, staging: Path) -> dict | None:
    """The record of a shard a previous run completed, or None."""
    try:
        record = json.loads((staging / f"{job.name}.json").read_text())
        done = (staging / f"{job.name}.tar").stat().st_size == record["bytes"]
    except (OSError, ValueError, KeyError):
        return None
    return record if done and (staging / f"{job.name}.idx").is_file() else None


def _prepare_staging(staging: Path, source: str, jobs: list[ShardJob], shard_size: int) -> None:
    """Keep a previous run's staging folder only if it was packing exactly this plan."""
    h = hashlib.sha256()
    for job in jobs:
        h.update(json.dumps(asdict(job)).encode())
    want = {"format": FORMAT, "source": str(source), "shard_size": shard_size, "plan": h.hexdigest()}
    plan_file = staging / "plan.json"
    if staging.exists():
        try:
            same = json.loads(plan_file.read_text()) == want
        except (OSError, ValueError):
            same = False
        if same:
            return
        print(f"discarding {staging}: it was packing another source, plan or shard size", file=sys.stderr)
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    _write_atomic(plan_file, json.dumps(want))


def pack(root: Path, out: Path, *, shard_size: int, workers: int = 1,
         splits: tuple[str, ...] = ("train", "val"), index_dir: str | None = None,
         progress: bool = True) -> dict:
    """Pack ROOT's splits into OUT; returns the manifest."""
    root, out = root.expanduser().resolve(), out.expanduser().resolve()
    if is_pack(root):
        raise DataError(f"{root} is a pack already; pack the image folder it was packed from")
    check_out(out)
    indices = {s: load_index(root, s, index_dir=index_dir) for s in splits}
    return write_pack(out, str(root), indices, plan(indices, shard_size), shard_size, workers=workers,
                      progress=progress)


def check_out(out: Path) -> None:
    """OUT must be new or an empty folder: an existing pack is never overwritten."""
    if is_pack(out):
        raise DataError(f"{out} is already a pack; delete it or choose another OUT")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not an empty folder; choose a new OUT")


def write_pack(out: Path, source: str, indices: dict[str, Index], jobs: list[ShardJob], shard_size: int, *,
               workers: int = 1, progress: bool = True, split_sources: dict[str, str] | None = None) -> dict:
    """Write the planned shards of `indices` (the samples, in order) and the index into OUT, atomically;
    split_sources: where each split's files were read from, when not SOURCE/<split>."""
    staging = out.parent / f".{out.name}.partial"
    _prepare_staging(staging, source, jobs, shard_size)
    records = {job.name: _finished(job, staging) for job in jobs}
    todo = [job for job in jobs if records[job.name] is None]
    total = sum(r["bytes"] for r in records.values() if r)
    bar = tqdm(total=sum(job.bytes for job in jobs), initial=total, unit="B", unit_scale=True,
               desc=f"pack {source} -> {out}", disable=not progress, file=sys.stderr)
    if workers > 1 and len(todo) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(todo))) as pool:
            for record in pool.imap_unordered(_write_shard_star, [(job, staging) for job in todo]):
                records[record["name"]] = record
                bar.update(record["bytes"])
    else:
        for job in todo:
            records[job.name] = write_shard(job, staging)
            bar.update(records[job.name]["bytes"])
    bar.close()
    manifest = {"format": FORMAT, "source": source, "classes": next(iter(indices.values())).classes,
                "checksum": CHECKSUM, "splits": {}}
    for split, ix in indices.items():
        split_records = [records[j.name] for j in jobs if j.split == split]
        rows = np.zeros(len(ix), SAMPLE_DTYPE)
        for k, r in enumerate(split_records):
            sl = slice(r["first"], r["first"] + r["samples"])
            rows["shard"][sl], rows["offset"][sl], rows["size"][sl] = k, r["offsets"], r["sizes"]
            rows["crc32c"][sl] = r["crc32c"]
        rows["label"] = ix.labels
        np.save(staging / f"{split}.samples.npy", rows)
        _write_atomic(staging / f"{split}.files.txt", "".join(f + "\n" for f in ix.files))
        manifest["splits"][split] = {"samples": len(ix), "shards": [
            {key: r[key] for key in ("name", "samples", "first", "bytes", "sha256")} for r in split_records]}
        if split_sources:
            manifest["splits"][split]["source"] = split_sources[split]
    for job in jobs:
        (staging / f"{job.name}.json").unlink()
    (staging / "plan.json").unlink()
    _write_atomic(staging / MANIFEST, json.dumps(manifest, indent=1))
    if out.exists():
        out.rmdir()  # empty (checked above): rename cannot replace it
    os.rename(staging, out)
    return manifest


def _write_shard_star(args: tuple[ShardJob, Path]) -> dict:
    return write_shard(*args)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m gcvit_data.pack", description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="dataset root with train/<class>/ and val/<class>/")
    ap.add_argument("out", type=Path, help="the pack folder to create (must not exist or be empty)")
    ap.add_argument("--shard-size", default="1GB", help="target bytes per shard (1GB, 512MB, 500MiB)")
    ap.add_argument("--workers", type=int, default=1, help="shards written in parallel")
    ap.add_argument("--splits", nargs="+", default=["train", "val"])
    ap.add_argument("--index-dir",
                    help="pack the clean index written by python -m gcvit_data.verify --write-index")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    manifest = pack(args.root, args.out, shard_size=parse_size(args.shard_size), workers=args.workers,
                    splits=tuple(args.splits), index_dir=args.index_dir, progress=not args.quiet)
    seconds = time.perf_counter() - start
    splits = manifest["splits"].values()
    n, shards = sum(s["samples"] for s in splits), sum(len(s["shards"]) for s in splits)
    size = sum(sh["bytes"] for s in splits for sh in s["shards"])
    per = ", ".join(f"{name}: {s['samples']}" for name, s in manifest["splits"].items())
    print(f"packed {n} images ({per}) into {shards} shards, {size / 1e9:.3f} GB, in {seconds:.1f} s "
          f"({n / seconds:.0f} img/s): {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
