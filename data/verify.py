"""Scan a dataset for files DALI cannot decode; optionally write a clean index that leaves them out.

    python -m gcvit_data.verify ROOT [--splits train val] [--workers 8] [--write-index DIR]

On a pack written by python -m gcvit_data.pack it checks the pack instead (data/pack_verify.py); on timm's
WebDataset shards (data/readers/wds.py), every sample as its reader gives it (bad ones named SHARD/MEMBER).

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
from gcvit_data.readers import wds
from gcvit_data.readers.folder import list_classes, scan, write_index
from gcvit_data.shards import is_pack

CHUNK = 256  # WebDataset samples per task of the decoding pool


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
def _shards(root: Path, split: str) -> Index:
    """A worker loads each split's index once, not once per chunk."""
    return wds.load(root, split)


def _check_samples(task: tuple[Path, str, int, int]) -> list[tuple[Path, str]]:
    """(SHARD/MEMBER, reason) of each bad sample among ids start..stop-1 of a WebDataset split."""
    root, split, start, stop = task
    ix, bad = _shards(root, split), []
    for i in range(start, stop):
        try:
            reason = check_bytes(ix.encoded(i), Path(ix.files[i]).suffix)
        except BadImage as e:  # a truncated shard
            reason = str(e)
        if reason:
            bad.append((ix.path(i), reason))
    return bad


def verify_shards(root: Path, splits: list[str], workers: int,
                  progress: bool = True) -> tuple[dict[str, Index], dict[Path, str]]:
    """Every sample of timm's WebDataset shards at ROOT decoded as verify() decodes a file."""
    root = root.expanduser().resolve()
    indices = {split: _shards(root, split) for split in splits}
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


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m gcvit_data.verify", description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="dataset root with train/<wnid>/ and val/<wnid>/, or a pack")
    ap.add_argument("--splits", nargs="+", default=["train", "val"])
    ap.add_argument("--workers", type=int, default=min(8, mp.cpu_count()), help="decoding processes")
    ap.add_argument("--write-index", type=Path, metavar="DIR",
                    help="write DIR/<split>.tsv without the bad files (train with data.index_dir=DIR)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if is_pack(args.root):
        if args.write_index:
            raise DataError(f"--write-index applies to image folders and {args.root} is a pack; a bad sample "
                            "in a pack means repacking its source (python -m gcvit_data.pack --index-dir)")
        return verify_pack_cli(args.root, args.splits, args.workers, progress=not args.quiet)
    shards = wds.detect(args.root.expanduser().resolve())
    if shards and args.write_index:
        raise DataError(f"--write-index applies to image folders and {args.root} holds WebDataset shards; "
                        "rewrite the shards named below without their bad samples")
    indices, bad = (verify_shards if shards else verify)(args.root, args.splits, args.workers,
                                                         progress=not args.quiet)
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


if __name__ == "__main__":
    sys.exit(main())
