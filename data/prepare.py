"""Turn the raw ImageNet-1K downloads into ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG.

    python -m gcvit_data.prepare imagenet --train-tar ILSVRC2012_img_train.tar --val ILSVRC2012_img_val.tar \\
        (--val-solution LOC_val_solution.csv | --devkit ILSVRC2012_devkit_t12.tar.gz) --out ROOT \\
        [--format shards [--shard-size 1GB] [--workers N]]

--from-parquet DIR (Hugging Face's parquet) and --from-kaggle DIR (Kaggle's CLS-LOC folders) replace the
tars: data/prepare_parquet.py, data/prepare_kaggle.py (docs/imagenet.md has a section on each source).

--format shards writes a pack (docs/shards.md) straight from the tars instead (data/prepare_shards.py); the
label files and naming rules both read are in data/imagenet.py.

The train tar holds one tar per class (n01440764.tar, ...); the val tar (or folder) is flat
(ILSVRC2012_val_00000001.JPEG, ...); val labels come from Kaggle's LOC_val_solution.csv or the devkit. Each
class folder and the val split appear atomically, so an interrupted run is simply started again (finished
class folders are skipped).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from tqdm import tqdm

from gcvit_data.imagenet import (
    check_val_complete,
    check_val_labels,
    class_of,
    labels_from_devkit,
    labels_from_solution,
    val_class,
)
from gcvit_data.index import DataError
from gcvit_data.pack import check_out, pack, parse_size
from gcvit_data.prepare_kaggle import prepare_from_kaggle
from gcvit_data.prepare_parquet import prepare_from_parquet  # imports pyarrow (an extra) only when it reads
from gcvit_data.prepare_shards import prepare_pack


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


def from_download(args: argparse.Namespace) -> int:
    """--from-parquet / --from-kaggle: their folder layout at OUT, or written beside OUT, packed into OUT
    (gcvit_data.pack) and removed."""
    prepare = prepare_from_parquet if args.from_parquet else prepare_from_kaggle
    out = args.out.expanduser().resolve()
    layout = out if args.format == "folder" else out.parent / f".{out.name}.staged"
    if args.format == "shards":
        check_out(out)
    done = prepare(args.from_parquet or args.from_kaggle, layout, check=args.check, workers=args.workers,
                   progress=not args.quiet)
    for reason, where in done.bad:
        print(f"{reason}\t{where}")
    print("\n".join(done.notes))
    what = f"{done.classes} classes, {done.counts['train']} train and {done.counts['val']} val images"
    what += f" ({len(done.bad)} bad images left out)" if args.check else ""
    if args.format == "shards":
        manifest = pack(layout, out, shard_size=parse_size(args.shard_size), workers=args.workers,
                        progress=not args.quiet)
        shutil.rmtree(layout)
        what = (f"pack of {what} in {sum(len(s['shards']) for s in manifest['splits'].values())} shards "
                f"(staged in {layout}, now removed)")
    print(f"{out}: {what}; next: python -m gcvit_data.verify {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m gcvit_data.prepare", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="dataset", required=True)
    im = sub.add_parser("imagenet", help="ILSVRC2012 train/val tars to ImageFolder layout")
    im.add_argument("--train-tar", type=Path, help="ILSVRC2012_img_train.tar")
    im.add_argument("--val", type=Path, help="ILSVRC2012_img_val.tar or its extracted folder")
    im.add_argument("--from-parquet", type=Path, metavar="DIR",
                    help="instead of the tars: Hugging Face's ILSVRC/imagenet-1k (DIR/data/*.parquet; "
                         "data/prepare_parquet.py)")
    im.add_argument("--from-kaggle", type=Path, metavar="DIR",
                    help="instead of the tars: Kaggle's ILSVRC/Data/CLS-LOC download, linked into --out "
                         "(data/prepare_kaggle.py)")
    labels = im.add_mutually_exclusive_group()
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
    if args.from_parquet or args.from_kaggle:
        return from_download(args)
    if not (args.train_tar and args.val and (args.val_solution or args.devkit)):
        ap.error("imagenet needs --train-tar, --val and --val-solution or --devkit (the ILSVRC2012 tars), or "
                 "--from-parquet DIR, or --from-kaggle DIR")
    for path in (args.train_tar, args.val, args.val_solution or args.devkit):
        if not path.exists():
            raise DataError(f"{path} does not exist")
    source = args.val_solution or args.devkit
    val_labels = labels_from_solution(source) if args.val_solution else labels_from_devkit(source)
    if args.format == "shards":
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
