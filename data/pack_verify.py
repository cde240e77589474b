"""`python -m gcvit_data.verify PACK` on a pack: shard sha256s, every sample's crc32c and decode, the counts.

Each problem is printed as one line naming the shard (and for a sample its offset and original file);
the exit code is 1 when any was found.
"""
from __future__ import annotations

import functools
import hashlib
import multiprocessing as mp
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gcvit_data.image_header import check_bytes
from gcvit_data.shards import PackReader, Split, corrupt_sample, read_manifest

CHUNK = 8 << 20


def check_counts(split: Split) -> list[str]:
    """The index, the manifest and the shards' sample ranges agree (each sample in exactly one shard)."""
    problems, expected = [], 0
    for k, shard in enumerate(split.shards):
        rows = split.samples["shard"][shard["first"]:shard["first"] + shard["samples"]]
        if shard["first"] != expected or len(rows) != shard["samples"] or np.any(rows != k):
            first, last = shard["first"], shard["first"] + shard["samples"] - 1
            problems.append(f"{split.shard_path(k)}: the index does not place samples {first}..{last} "
                            "in this shard as pack.json says; repack")
        expected = shard["first"] + shard["samples"]
    if expected != len(split):
        problems.append(f"{split.root}: the {split.name} shards hold {expected} samples, the index "
                        f"{len(split)}; repack")
    return problems


def check_shard(split: Split, k: int) -> tuple[int, list[str]]:
    """(samples checked, problems) for shard k: its size and sha256, then each sample's crc32c and decode."""
    path, entry = split.shard_path(k), split.shards[k]
    try:
        size = path.stat().st_size
    except OSError as e:
        return 0, [f"{path}: missing or unreadable ({e.strerror}); restore it or repack"]
    problems = []
    if not split.shard_path(k, "idx").is_file():
        problems.append(f"{split.shard_path(k, 'idx')}: missing (DALI's webdataset reader needs it); repack")
    if size != entry["bytes"]:
        problems.append(f"{path}: {size} bytes, pack.json says {entry['bytes']}; restore it or repack")
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            sha.update(block)
    if sha.hexdigest() != entry["sha256"]:
        problems.append(f"{path}: sha256 {sha.hexdigest()}, pack.json says {entry['sha256']}; the shard "
                        "changed after packing: restore it or repack")
    reader = PackReader(split)
    try:
        for i in range(entry["first"], entry["first"] + entry["samples"]):
            data, reason = reader.read_checked(i)
            if reason := reason or check_bytes(data, Path(split.files[i]).suffix):
                problems.append(corrupt_sample(path, int(split.samples[i]["offset"]), split.original(i), i,
                                               reason))
    finally:
        reader.close()
    return entry["samples"], problems


@functools.lru_cache(maxsize=2)
def _split(root: Path, name: str) -> Split:
    """A worker loads each split's index once, not once per shard (1.28M file names take a while)."""
    return Split.load(root, name)


def _check_shard(args: tuple[Path, str, int]) -> tuple[int, list[str]]:
    root, split, k = args
    return check_shard(_split(root, split), k)


def verify_pack(root: Path, splits: list[str], workers: int,
                progress: bool = True) -> tuple[dict[str, int], int, list[str]]:
    """({split: samples}, shards checked, problem lines) for the given splits of the pack at ROOT."""
    root = root.expanduser().resolve()
    names = [s for s in splits if s in read_manifest(root)["splits"]]
    loaded = {s: Split.load(root, s) for s in names}
    problems = [p for split in loaded.values() for p in check_counts(split)]
    tasks = [(root, s, k) for s in names for k in range(len(loaded[s].shards))]
    with mp.get_context("spawn").Pool(max(1, min(workers, len(tasks)))) as pool:
        for _, found in tqdm(pool.imap(_check_shard, tasks), total=len(tasks), desc=f"verify {root}",
                             unit="shard", disable=not progress, file=sys.stderr):
            problems += found
    return {s: len(split) for s, split in loaded.items()}, len(tasks), problems


def verify_pack_cli(root: Path, splits: list[str], workers: int, progress: bool) -> int:
    """Print each problem and a summary line; 1 when any problem was found."""
    counts, shards, problems = verify_pack(root, splits, workers, progress)
    for line in problems:
        print(line)
    per_split = ", ".join(f"{s}: {n}" for s, n in counts.items())
    print(f"checked {sum(counts.values())} samples in {shards} shards of {root.resolve()} ({per_split}): "
          f"{len(problems)} problems")
    return 1 if problems else 0
