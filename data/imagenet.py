"""ImageNet-1K's download conventions: the per-class train tars, the flat val file names, the val label files.

Val labels come from Kaggle's LOC_val_solution.csv (first wnid of each PredictionString) or from the devkit,
whose ground truth lists ILSVRC2012_IDs in image order: IDs are mapped to wnids through the devkit's meta.mat
(ID order is not sorted-wnid order; the class index used for training is the sorted-wnid position). Both
`python -m gcvit_data.prepare imagenet` formats (folder, shards) read them through this module.
"""
from __future__ import annotations

import csv
import io
import os
import re
import tarfile
from pathlib import Path
from typing import NamedTuple

from gcvit_data.index import DataError

VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")


class Prepared(NamedTuple):
    """What a download turned into the folder layout holds (prepare --from-parquet / --from-kaggle)."""

    classes: int
    counts: dict[str, int]  # images per split (train, val)
    bad: list[tuple[str, str]]  # (reason, image) of each image --check left out
    notes: list[str]  # lines to print: the label order found, what was skipped


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
