"""Kaggle's ImageNet download (ILSVRC/Data/CLS-LOC) -> our folder layout, made of links: no copy of the JPEGs.

    python -m gcvit_data.prepare imagenet --from-kaggle DIR --out ROOT [--check] [--format shards]

DIR is the unpacked imagenet-object-localization-challenge download: DIR/ILSVRC/Data/CLS-LOC/train/<wnid>/,
the flat DIR/ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_XXXXXXXX.JPEG, DIR/LOC_val_solution.csv (val labels,
the first wnid of each PredictionString) and DIR/LOC_synset_mapping.txt (the 1000 wnids). ROOT/train/<wnid>
is a link to each train class folder and ROOT/val/<wnid>/<file> a link to each val image, so ROOT is the
layout data.root reads while the JPEGs stay where Kaggle put them (keep DIR). Each split appears
atomically; a rerun skips the finished ones. --check decodes every image first (gcvit_data.verify's test)
and links only the good ones. --format shards packs that linked layout (written beside OUT, removed after)
into OUT: a pack with no intermediate copy.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
from functools import partial
from pathlib import Path

from tqdm import tqdm

from gcvit_data.imagenet import (
    Prepared,
    check_val_complete,
    check_val_labels,
    labels_from_solution,
    val_class,
)
from gcvit_data.index import IMAGE_EXTENSIONS, DataError
from gcvit_data.verify import check_file

CLS_LOC = Path("ILSVRC", "Data", "CLS-LOC")


def layout(src: Path) -> tuple[Path, Path, Path, Path]:
    """(train folder, val folder, LOC_val_solution.csv, LOC_synset_mapping.txt) of the Kaggle download."""
    parts = (src / CLS_LOC / "train", src / CLS_LOC / "val", src / "LOC_val_solution.csv",
             src / "LOC_synset_mapping.txt")
    for p in parts:
        if not p.exists():
            raise DataError(f"{p} does not exist; point --from-kaggle at the unpacked Kaggle download (the "
                            "folder holding ILSVRC/ and LOC_val_solution.csv)")
    return parts


def synsets(mapping: Path) -> list[str]:
    """The wnids of LOC_synset_mapping.txt (`n01440764 tench, Tinca tinca` lines), in the file's order."""
    wnids = []
    for line, text in enumerate(mapping.read_text().splitlines(), start=1):
        wnid = text.split(" ", 1)[0]
        if not (len(wnid) == 9 and wnid[0] == "n" and wnid[1:].isdigit()):
            raise DataError(f"{mapping}:{line}: expected `nXXXXXXXX name`, got {text!r}")
        wnids.append(wnid)
    return wnids


def train_classes(train: Path, mapping: Path) -> tuple[list[str], str]:
    """The sorted class folders of the train folder, checked against LOC_synset_mapping.txt; and one line
    on the label order."""
    wnids = sorted(p.name for p in train.iterdir() if p.is_dir())
    listed = synsets(mapping)
    if set(wnids) != set(listed):
        odd = sorted(set(wnids) ^ set(listed))
        raise DataError(f"{train} has {len(wnids)} class folders and {mapping} lists {len(listed)} wnids; "
                        f"they differ in {len(odd)} (e.g. {odd[0]}): is the download complete?")
    order = "is" if listed == wnids else "is not (training uses the sorted order regardless)"
    return wnids, (f"labels: {mapping.name} {order} the standard sorted-wnid order; label i is the i-th of "
                   f"the {len(wnids)} sorted wnids (label 0 = {wnids[0]})")


def bad_files(paths: list[Path], workers: int, progress: bool) -> dict[Path, str]:
    """{file: reason} of the images gcvit_data.verify rejects, decoded over `workers` processes."""
    bar = partial(tqdm, total=len(paths), desc="check images", unit="img", disable=not progress,
                  file=sys.stderr)
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            reasons = list(bar(pool.imap(check_file, paths, chunksize=64)))
    else:
        reasons = [check_file(p) for p in bar(paths)]
    return {p: r for p, r in zip(paths, reasons) if r}


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished split into place (a split with every image left out is still finished)."""
    tmp.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)


def link_train(train: Path, wnids: list[str], out: Path, bad: dict[Path, str]) -> int:
    """OUT/train/<wnid> -> the Kaggle class folder (a folder of links to its good images where --check found
    bad ones in it); returns the number of images."""
    final, tmp = out / "train", out / ".train.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = 0
    for w in wnids:
        images = [p for p in sorted((train / w).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not any(p in bad for p in images):
            (tmp / w).symlink_to(train / w, target_is_directory=True)
        else:
            (tmp / w).mkdir()
            for p in images:
                if p not in bad:
                    (tmp / w / p.name).symlink_to(p)
        n += sum(p not in bad for p in images)
    _publish(tmp, final)
    return n


def link_val(val: Path, labels: dict[str, str], wnids: list[str], out: Path, source: Path,
             bad: dict[Path, str]) -> int:
    """OUT/val/<wnid>/<file> -> each flat val image of its class (LOC_val_solution.csv); returns how many."""
    check_val_labels(labels, wnids, source)
    final, tmp = out / "val", out / ".val.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    seen, n = set(), 0
    for p in sorted(val.iterdir()):
        wnid = val_class(p.name, labels, val, source)
        seen.add(p.name)
        if p not in bad:
            (tmp / wnid).mkdir(exist_ok=True)
            (tmp / wnid / p.name).symlink_to(p)
            n += 1
    check_val_complete(labels, seen, val, source)
    _publish(tmp, final)
    return n


def prepare_from_kaggle(src: Path, out: Path, *, check: bool = False, workers: int = 1,
                        progress: bool = True) -> Prepared:
    """Link OUT/{train,val} to the Kaggle download SRC (`prepare imagenet --from-kaggle`)."""
    train, val, solution, mapping = (p.resolve() for p in layout(src.expanduser()))
    wnids, order = train_classes(train, mapping)
    labels = labels_from_solution(solution)
    todo = [s for s in ("train", "val") if not (out / s).is_dir()]  # finished splits are kept
    images = ([p for w in wnids for p in sorted((train / w).iterdir())] if "train" in todo else []) + (
        sorted(val.iterdir()) if "val" in todo else [])
    bad = bad_files(images, workers, progress) if check else {}
    counts = {s: sum(len(files) for _, _, files in os.walk(out / s, followlinks=True))
              for s in ("train", "val") if s not in todo}
    if "train" in todo:
        counts["train"] = link_train(train, wnids, out, bad)
    if "val" in todo:
        counts["val"] = link_val(val, labels, wnids, out, solution, bad)
    notes = [order, f"links into {src.expanduser().resolve()}: keep it"]
    return Prepared(len(wnids), counts, [(reason, str(p)) for p, reason in sorted(bad.items())], notes)
