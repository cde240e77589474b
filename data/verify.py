"""Scan a dataset for files DALI cannot decode; optionally write a clean index that leaves them out.

    python -m gcvit_data.verify ROOT [--splits train val] [--workers 8] [--write-index DIR]

What it checks follows the reader of ROOT (gcvit_data.readers.source_of): an image folder file by file; a
pack written by python -m gcvit_data.pack its shards, checksums and samples (data/pack_verify.py); any other
source (timm's WebDataset shards, ...) every sample as its reader gives it (bad ones named SHARD/MEMBER).

DALI cannot skip a bad file at run time, so train on the clean index (data.index_dir=DIR) when this finds
any. Each bad file is printed as `REASON<TAB>PATH`; the exit code is 1 when bad files were found and no
clean index was written.
"""
from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from gcvit_data.image_header import check_bytes
from gcvit_data.index import BadImage, DataError, Index
from gcvit_data.pack_verify import verify_pack_cli
from gcvit_data.readers import folder, load_index, pack, source_of
from gcvit_data.readers.folder import list_classes, scan, write_index

CHUNK = 256  # samples per task of the decoding pool (sources read through their reader)


def check_file(path: Path) -> str | None:
    """Why `path` is not a clean RGB/grayscale image matching its extension, or None when it is."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"unreadable ({e.strerror})"
    return check_bytes(data, path.suffix)


def _check(path: Path) -> tuple[Path, str | None]:
    return path, check_file(path)


def verify(root: Path, splits: list[str], workers: int,
           progress: bool = True) -> tuple[dict[str, Index], dict[Path, str]]:
    """Index every split of ROOT and check every file; returns the indices and {bad path: reason}."""
    root = root.expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{root} does not exist or is not a directory")
    classes = list_classes(root / "train")
    indices = {split: scan(root / split, classes) for split in splits}
    paths = [ix.path(i) for ix in indices.values() for i in range(len(ix))]
    bad: dict[Path, str] = {}
    with mp.get_context("spawn").Pool(max(1, workers)) as pool:
        results = pool.imap_unordered(_check, paths, chunksize=64)
        for path, reason in tqdm(results, total=len(paths), desc=f"verify {root}", unit="img",
                                 disable=not progress, file=sys.stderr):
            if reason is not None:
                bad[path] = reason
    return indices, bad


@functools.lru_cache(maxsize=2)
def _index(root: Path, split: str) -> Index:
    """A worker loads each split's index once, not once per chunk."""
    return load_index(root, split)


def _check_samples(task: tuple[Path, str, int, int]) -> list[tuple[Path, str]]:
    """(name, reason) of each bad sample among ids start..stop-1 of a split (inside shards: SHARD/MEMBER)."""
    root, split, start, stop = task
    ix, bad = _index(root, split), []
    for i in range(start, stop):
        try:
            reason = check_bytes(ix.encoded(i), Path(ix.files[i]).suffix)
        except BadImage as e:  # e.g. a truncated shard
            reason = str(e)
        if reason:
            bad.append((ix.path(i), reason))
    return bad


def verify_samples(root: Path, splits: list[str], workers: int,
                   progress: bool = True) -> tuple[dict[str, Index], dict[Path, str]]:
    """Every sample of ROOT as its reader gives it (gcvit_data.readers), decoded as verify() decodes files."""
    root = root.expanduser().resolve()
    indices = {split: _index(root, split) for split in splits}
    tasks = [(root, s, k, min(k + CHUNK, len(ix)))
             for s, ix in indices.items() for k in range(0, len(ix), CHUNK)]
    bad: dict[Path, str] = {}
    with mp.get_context("spawn").Pool(max(1, min(workers, len(tasks)))) as pool:
        for found in tqdm(pool.imap_unordered(_check_samples, tasks), total=len(tasks), desc=f"verify {root}",
                          unit="chunk", disable=not progress, file=sys.stderr):
            bad.update(found)
    return indices, bad


def clean(index: Index, bad: dict[Path, str]) -> Index:
    """The index without the bad files."""
    keep = [i for i in range(len(index)) if index.path(i) not in bad]
    return Index(index.root, index.classes, [index.files[i] for i in keep], [index.labels[i] for i in keep])


def _pack(args: argparse.Namespace) -> int:
    """A pack: its own checks (shard sha256s, each sample's crc32c and decode, the counts)."""
    if args.write_index:
        raise DataError(f"--write-index applies to image folders and {args.root} is a pack; a bad sample "
                        "in a pack means repacking its source (python -m gcvit_data.pack --index-dir)")
    return verify_pack_cli(args.root, args.splits, args.workers, progress=not args.quiet)


def _samples(args: argparse.Namespace) -> int:
    """Any other source: every sample as its reader gives it."""
    if args.write_index:
        raise DataError(f"--write-index applies to image folders and {args.root} is read by "
                        f"{source_of(args.root).__name__}; run without it to list the bad samples, then "
                        "rewrite them in the source")
    return _report(args, *verify_samples(args.root, args.splits, args.workers, progress=not args.quiet))


def _folder(args: argparse.Namespace) -> int:
    """An image folder: every file, and with --write-index a clean index without the bad ones."""
    return _report(args, *verify(args.root, args.splits, args.workers, progress=not args.quiet))


CHECKS = {pack: _pack, folder: _folder}  # by reader; every other reader: _samples


def _report(args: argparse.Namespace, indices: dict[str, Index], bad: dict[Path, str]) -> int:
    """Print each bad sample and the summary; write the clean index when asked. The exit code."""
    for path, reason in sorted(bad.items()):
        print(f"{reason}\t{path}")
    total = sum(len(ix) for ix in indices.values())
    kinds = Counter(reason.split(" (")[0] for reason in bad.values())
    detail = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
    per_split = ", ".join(f"{s}: {len(ix)}" for s, ix in indices.items())
    print(f"checked {total} images in {args.root.resolve()} ({per_split}): {len(bad)} bad"
          + (f" ({detail})" if bad else ""))
    if args.write_index:
        for split, ix in indices.items():
            out = args.write_index / f"{split}.tsv"
            kept = clean(ix, bad)
            write_index(kept, out)
            print(f"wrote {out} ({len(kept)} images)")
        print(f"train on it with data.index_dir={args.write_index.resolve()}")
        return 0
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m gcvit_data.verify", description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="dataset root with train/<wnid>/ and val/<wnid>/, a pack, or "
                    "any other source data.root reads")
    ap.add_argument("--splits", nargs="+", default=["train", "val"])
    ap.add_argument("--workers", type=int, default=min(8, mp.cpu_count()), help="decoding processes")
    ap.add_argument("--write-index", type=Path, metavar="DIR",
                    help="write DIR/<split>.tsv without the bad files (train with data.index_dir=DIR)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if not args.root.expanduser().is_dir():
        raise DataError(f"{args.root.expanduser().resolve()} does not exist or is not a directory")
    return CHECKS.get(source_of(args.root), _samples)(args)


if __name__ == "__main__":
    sys.exit(main())
