"""Turn the raw ImageNet-1K downloads into ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG.

    python -m gcvit_data.prepare imagenet --train-tar ILSVRC2012_img_train.tar --val ILSVRC2012_img_val.tar \\
        (--val-solution LOC_val_solution.csv | --devkit ILSVRC2012_devkit_t12.tar.gz) --out ROOT \\
        [--format shards [--shard-size 1GB] [--workers N]]

--format shards writes a pack (docs/shards.md) straight from the tars instead (data/prepare_shards.py).

The train tar holds one tar per class (n01440764.tar, ...); the val tar (or folder) is flat
(ILSVRC2012_val_00000001.JPEG, ...). Val labels come from Kaggle's LOC_val_solution.csv (first wnid of each
PredictionString) or from the devkit, whose ground truth lists ILSVRC2012_IDs in image order: IDs are
mapped to wnids through the devkit's meta.mat (ID order is not sorted-wnid order; the class index used for
training is the sorted-wnid position). Each class folder and the val split appear atomically, so an
interrupted run is simply started again (finished class folders are skipped).
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import re
import shutil
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from tqdm import tqdm

from gcvit_data.index import DataError

VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")


def _files(tar: tarfile.TarFile) -> Iterator[tuple[str, IO[bytes]]]:
    """(base name, stream) of every regular file of a streamed tar; never trusts member paths."""
    for member in tar:
        if member.isfile():
            f = tar.extractfile(member)
            if f is not None:
                yield os.path.basename(member.name), f


def _write(path: Path, stream: IO[bytes]) -> None:
    with open(path, "wb") as out:
        shutil.copyfileobj(stream, out, 1 << 20)


def extract_train(train_tar: Path, out: Path) -> list[str]:
    """Unpack the tar of per-class tars into out/train/<wnid>/; returns the sorted wnids."""
    train = out / "train"
    train.mkdir(parents=True, exist_ok=True)
    wnids = []
    with tarfile.open(train_tar, "r|*") as outer:
        for name, stream in tqdm(_files(outer), desc="train classes", unit="class", file=sys.stderr):
            wnid = class_of(name, train_tar)
            wnids.append(wnid)
            if (train / wnid).is_dir():
                continue  # finished by an earlier run
            tmp = train / f".{wnid}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            with tarfile.open(fileobj=stream, mode="r|*") as inner:
                n = 0
                for fname, f in _files(inner):
                    _write(tmp / fname, f)
                    n += 1
            if n == 0:
                raise DataError(f"{name} inside {train_tar} holds no images")
            os.replace(tmp, train / wnid)
    if not wnids:
        raise DataError(f"{train_tar} holds no per-class tars")
    return sorted(wnids)


def class_of(name: str, train_tar: Path) -> str:
    """The wnid of a member of the train tar, which holds only per-class tars."""
    wnid, ext = os.path.splitext(name)
    if ext != ".tar":
        raise DataError(f"{train_tar} holds {name}; expected only per-class tars like n01440764.tar")
    return wnid


def labels_from_solution(csv_path: Path) -> dict[str, str]:
    """{ILSVRC2012_val_XXXXXXXX: wnid} from LOC_val_solution.csv (ImageId,PredictionString)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:2] != ["ImageId", "PredictionString"]:
        raise DataError(f"{csv_path} does not start with the header ImageId,PredictionString "
                        "(Kaggle's LOC_val_solution.csv)")
    labels = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) < 2 or not row[1].split():
            got = ",".join(row)
            raise DataError(f"{csv_path}:{line}: expected `ImageId,wnid x0 y0 x1 y1 ...`, got {got!r}")
        labels[row[0]] = row[1].split()[0]
    return labels


def labels_from_devkit(devkit: Path) -> dict[str, str]:
    """{ILSVRC2012_val_XXXXXXXX: wnid} from the devkit's ground truth (ILSVRC2012_IDs) and meta.mat."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("reading the devkit needs scipy: pip install 'gcvit-train[prepare]' (or use "
                        "--val-solution LOC_val_solution.csv)") from None
    meta = truth = None
    with tarfile.open(devkit, "r:*") as tar:
        for member in tar.getmembers():
            if member.name.endswith("data/meta.mat"):
                meta = loadmat(io.BytesIO(tar.extractfile(member).read()), squeeze_me=True)["synsets"]
            elif member.name.endswith("data/ILSVRC2012_validation_ground_truth.txt"):
                truth = tar.extractfile(member).read().decode().split()
    if meta is None or truth is None:
        raise DataError(f"{devkit} lacks data/meta.mat or data/ILSVRC2012_validation_ground_truth.txt; "
                        "is it ILSVRC2012_devkit_t12.tar.gz?")
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in meta if int(s["num_children"]) == 0}
    labels = {}
    for n, ilsvrc_id in enumerate(truth, start=1):
        if int(ilsvrc_id) not in id_to_wnid:
            raise DataError(f"{devkit}: ground truth line {n} has ILSVRC2012_ID {ilsvrc_id}, which meta.mat "
                            "does not list as a leaf class")
        labels[f"ILSVRC2012_val_{n:08d}"] = id_to_wnid[int(ilsvrc_id)]
    return labels


def _val_files(val: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """The flat val images from a tar or a folder."""
    if val.is_dir():
        for p in sorted(val.iterdir()):
            if p.is_file():
                with open(p, "rb") as f:
                    yield p.name, f
        return
    with tarfile.open(val, "r|*") as tar:
        yield from _files(tar)


def place_val(val: Path, labels: dict[str, str], wnids: list[str], out: Path, source: Path) -> int:
    """Write out/val/<wnid>/ from the flat val images; any mismatch with the labels is one clear error."""
    final = out / "val"
    if final.is_dir():
        return sum(1 for _ in final.rglob("*.JPEG"))
    check_val_labels(labels, wnids, source)
    tmp = out / ".val.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for w in wnids:
        (tmp / w).mkdir(parents=True)
    seen = set()
    for name, f in tqdm(_val_files(val), desc="val images", unit="img", file=sys.stderr):
        _write(tmp / val_class(name, labels, val, source) / name, f)
        seen.add(name)
    check_val_complete(labels, seen, val, source)
    os.replace(tmp, final)
    return len(seen)


def check_val_labels(labels: dict[str, str], wnids: list[str], source: Path) -> None:
    """Every val label must be a train class."""
    known = set(wnids)
    unknown = sorted({w for w in labels.values() if w not in known})
    if unknown:
        raise DataError(f"{source} labels val images with {len(unknown)} wnids the train tar lacks "
                        f"(e.g. {unknown[0]}); are they the same ImageNet release?")


def val_class(name: str, labels: dict[str, str], val: Path, source: Path) -> str:
    """The wnid of the flat val image `name`."""
    if not VAL_NAME.fullmatch(name):
        raise DataError(f"{val} holds {name}; expected flat ILSVRC2012_val_XXXXXXXX.JPEG files")
    stem = name.rsplit(".", 1)[0]
    if stem not in labels:
        raise DataError(f"{source} has no label for {name}; the label file does not match {val}")
    return labels[stem]


def check_val_complete(labels: dict[str, str], seen: set[str], val: Path, source: Path) -> None:
    """Every labelled val image must have been found (`seen`: their file names)."""
    missing = sorted(set(labels) - {name.rsplit(".", 1)[0] for name in seen})
    if missing:
        raise DataError(f"{source} labels {len(labels)} val images but {val} holds {len(seen)} "
                        f"(e.g. {missing[0]} is missing); the label file does not match the images")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m gcvit_data.prepare", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="dataset", required=True)
    im = sub.add_parser("imagenet", help="ILSVRC2012 train/val tars to ImageFolder layout")
    im.add_argument("--train-tar", type=Path, required=True, help="ILSVRC2012_img_train.tar")
    im.add_argument("--val", type=Path, required=True, help="ILSVRC2012_img_val.tar or its extracted folder")
    labels = im.add_mutually_exclusive_group(required=True)
    labels.add_argument("--val-solution", type=Path, help="Kaggle's LOC_val_solution.csv")
    labels.add_argument("--devkit", type=Path, help="ILSVRC2012_devkit_t12.tar.gz")
    im.add_argument("--out", type=Path, required=True, help="dataset root or pack to create (data.root)")
    im.add_argument("--format", choices=("folder", "shards"), default="folder",
                    help="folder: extract ROOT/<split>/<wnid>/ files; shards: write a pack straight from the "
                         "tars (docs/shards.md), extracting nothing")
    im.add_argument("--shard-size", default="1GB", help="--format shards: bytes per shard (1GB, 512MB)")
    im.add_argument("--workers", type=int, default=1, help="--format shards: shards written in parallel")
    im.add_argument("--check", action="store_true",
                    help="--format shards: decode every image first and leave out the ones gcvit_data.verify "
                         "rejects (printed as REASON<TAB>IMAGE)")
    im.add_argument("--quiet", action="store_true", help="--format shards: no progress bar")
    args = ap.parse_args(argv)
    for path in (args.train_tar, args.val, args.val_solution or args.devkit):
        if not path.exists():
            raise DataError(f"{path} does not exist")
    source = args.val_solution or args.devkit
    val_labels = labels_from_solution(source) if args.val_solution else labels_from_devkit(source)
    if args.format == "shards":
        from gcvit_data.pack import parse_size
        from gcvit_data.prepare_shards import prepare_pack  # builds on this module

        manifest, bad = prepare_pack(args.train_tar, args.val, val_labels, source, args.out,
                                     shard_size=parse_size(args.shard_size), workers=args.workers,
                                     check=args.check, progress=not args.quiet)
        for reason, image in bad:
            print(f"{reason}\t{image}")
        splits = manifest["splits"]
        left_out = f" ({len(bad)} bad images left out)" if args.check else ""
        print(f"{args.out}: pack of {len(manifest['classes'])} classes, {splits['train']['samples']} train "
              f"and {splits['val']['samples']} val images{left_out} in "
              f"{sum(len(s['shards']) for s in splits.values())} shards; "
              f"next: python -m gcvit_data.verify {args.out}")
        return 0
    wnids = extract_train(args.train_tar, args.out)
    n_val = place_val(args.val, val_labels, wnids, args.out, source)
    n_train = sum(1 for _ in (args.out / "train").rglob("*.JPEG"))
    print(f"{args.out}: {len(wnids)} classes, {n_train} train and {n_val} val images; "
          f"next: python -m gcvit_data.verify {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
