"""The evaluation sets papers report besides ImageNet val, each as an Index in the 1000-class label space.

Layouts and rules (the folder layouts are the ones the sets are published in):
- val: ROOT/val/<wnid>/*.JPEG, every image once.
- real: the val images scored against ImageNet-ReaL's label sets (Beyer et al. 2020), found by their original
  ILSVRC2012_val_NNNNNNNN number; an image with an empty set is left out. timm ships the labels file.
- v2: ImageNetV2 folders named 0..999 by class index (ordered as numbers, never as strings).
- a, r: ImageNet-A / -R, wnid folders of a 200-class subset; the logits are restricted to those 200 classes
  (the protocol of both papers; some later papers take the argmax over all 1000, which scores lower).
- sketch: ImageNet-Sketch, wnid folders of all 1000 classes.
"""
from __future__ import annotations

import json
import os
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path

from gcvit_data.config import EVAL_SETS
from gcvit_data.index import IMAGE_EXTENSIONS, DataError, Index
from gcvit_data.readers import load_index

PROTOCOLS = {
    "val": "top-1/top-5 over the 1000 classes",
    "real": "top-1 correct when in the image's ReaL label set; images with an empty set excluded",
    "v2": "top-1/top-5 over the 1000 classes (ImageNetV2 matched-frequency layout, folders = class index)",
    "a": "logits restricted to ImageNet-A's 200 classes",
    "r": "logits restricted to ImageNet-R's 200 classes",
    "sketch": "top-1/top-5 over the 1000 classes",
}
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})")


@dataclass
class EvalSet:
    """One set, ready for a loader: its images, and how its predictions are scored."""

    name: str
    index: Index | None  # labels index the model's classes (real: the val label); None: synthetic images
    protocol: str  # one line, copied into the results
    subset: list[int] | None = None  # class indices the logits are restricted to (a, r)
    real: list[list[int]] | None = None  # per sample of `index`: its ReaL label set (real)
    size: int = 0  # images in the set (len(index) where there is one)
    classes: list[str] | None = None  # the model's class names, for per-class results

    def __post_init__(self) -> None:
        if self.index is not None:
            self.size, self.classes = len(self.index), self.classes or self.index.classes


def timm_info(name: str) -> str:
    """A file of timm's ImageNet metadata (synset lists, ReaL labels): shipped with timm, no download."""
    raw = pkgutil.get_data("timm.data", f"_info/{name}")
    if raw is None:
        raise DataError(f"timm's package data _info/{name} is missing; reinstall timm")
    return raw.decode()


def _images(d: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(d) if e.name.lower().endswith(IMAGE_EXTENSIONS))


def _folders(root: Path, what: str) -> list[str]:
    if not root.is_dir():
        raise DataError(f"{what} root {root} does not exist or is not a directory")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataError(f"{root} has no class folders; expected the {what} layout (see data/eval_sets.py)")
    return names


def folder_index(root: Path, classes: list[str], what: str, by_number: bool = False) -> Index:
    """Index of ROOT/<class>/*.JPEG whose folders are wnids of `classes`, or class indices (by_number)."""
    files: list[str] = []
    labels: list[int] = []
    position = {c: i for i, c in enumerate(classes)}
    names = _folders(root, what)
    if by_number:
        bad = [n for n in names if not n.isdigit() or int(n) >= len(classes)]
        if bad:
            raise DataError(f"{root / bad[0]}: {what} folders must be class indices 0..{len(classes) - 1}")
        names.sort(key=int)
    for name in names:
        if not by_number and name not in position:
            raise DataError(f"{root / name} is not one of the model's {len(classes)} classes "
                            "(wnid folders expected)")
        found = _images(root / name)
        files += [f"{name}/{f}" for f in found]
        labels += [int(name) if by_number else position[name]] * len(found)
    if not files:
        raise DataError(f"{root} holds no images (*.JPEG/*.jpg/*.png)")
    return Index(root, list(classes), files, labels)


def real_labels(val: Index, labels_file: str | None) -> list[list[int]]:
    """ReaL's label set of each val image, by its original file number (labels_file: null = timm's copy)."""
    text = Path(labels_file).read_text() if labels_file else timm_info("imagenet_real_labels.json")
    table = json.loads(text)
    out = []
    for f in val.files:
        m = _VAL_NUMBER.search(f)
        if m is None or not 1 <= int(m[1]) <= len(table):
            raise DataError(f"{val.root / f}: ReaL needs the original val file names "
                            "(ILSVRC2012_val_NNNNNNNN.JPEG) to find each image's labels")
        out.append(table[int(m[1]) - 1])
    return out


def build_eval_set(name: str, *, data_root: str | None, set_root: str | None, classes: list[str],
                   real_file: str | None = None, index_cache: str | None = None) -> EvalSet:
    """The set `name`; `classes` are the model's (1000 wnids for every set but val)."""
    if name not in EVAL_SETS:
        raise DataError(f"eval.sets: {name!r} is not one of {', '.join(EVAL_SETS)}")
    if name in ("val", "real"):
        if not data_root:
            raise DataError(f"eval set {name} reads the val split of data.root, which is not set")
        val = load_index(data_root, "val", index_cache=index_cache)
        if name == "val":
            return EvalSet(name, val, PROTOCOLS[name])
        return EvalSet(name, val, PROTOCOLS[name], real=real_labels(val, real_file))
    if len(classes) != 1000:
        raise DataError(f"eval set {name} scores ImageNet-1K classes, but the model has {len(classes)}")
    if not set_root:
        raise DataError(f"eval set {name} needs its folder: set eval.{name}_root=/path/to/{name}")
    root = Path(set_root).expanduser().resolve()
    index = folder_index(root, classes, f"ImageNet-{name.upper()}", by_number=name == "v2")
    subset = None
    if name in ("a", "r"):
        wnids = timm_info(f"imagenet_{name}_synsets.txt").split()
        subset = sorted(classes.index(w) for w in wnids)
        outside = sorted({index.classes[lab] for lab in index.labels} - set(wnids))
        if outside:
            raise DataError(f"{root / outside[0]} is not one of ImageNet-{name.upper()}'s 200 classes")
    return EvalSet(name, index, PROTOCOLS[name], subset=subset)
