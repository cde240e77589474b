"""data.val_split: a held-out validation set drawn from ROOT/train, for datasets that come without ROOT/val.

Stratified (the same fraction of every class), deterministic (a function of the sorted file list and
data.val_split_seed only, so every rank, every restart and mode=eval draw the same images) and disjoint from
the training images by construction.
"""
from __future__ import annotations

import hashlib

import numpy as np

from gcvit_data.config import DataConfig
from gcvit_data.index import DataError, Index
from gcvit_data.readers import load_split


def held_out(index: Index, fraction: float, seed: int) -> tuple[Index, Index, dict]:
    """(train, val, record): round(fraction x n) images of each class with n >= 2 go to val, at least one."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(index.labels):
        by_class.setdefault(y, []).append(i)
    val: set[int] = set()
    for y in sorted(by_class):
        members = by_class[y]
        k = min(max(1, round(fraction * len(members))), len(members) - 1)  # a class keeps a training image
        val.update(members[j] for j in rng.permutation(len(members))[:k])

    def part(keep: bool) -> Index:
        return index.subset([i for i in range(len(index)) if (i in val) == keep])

    train, held = part(False), part(True)
    digest = hashlib.sha1("\n".join(held.files).encode()).hexdigest()
    record = {"fraction": fraction, "seed": seed, "train_images": len(train), "val_images": len(held),
              "classes": len(index.classes), "val_files_sha1": digest}
    return train, held, record


def describe(record: dict) -> str:
    """The one line a run prints about the split it made."""
    unused = f"; {record['unused_val']} is not used" if record.get("unused_val") else ""
    return (f"val split: held out {record['val_images']} of {record['train_images'] + record['val_images']} "
            f"images of {record['source']} ({record['fraction']:.0%} of each of {record['classes']} classes, "
            f"seed {record['seed']}); {record['train_images']} train on; recorded in run_info.json{unused}")


def split_index(data: DataConfig, train: bool) -> tuple[Index, dict | None]:
    """The images of the train or val split and the held-out record, if one was made.

    Train: data.train_list, else ROOT/train. Val: data.val_list, else data.val_split of the train images,
    else ROOT/val."""
    if data.train_list or train or data.val_split:
        whole = load_split(data, "train")
    if data.val_split:
        parts = held_out(whole, data.val_split, data.val_split_seed)
        record = {**parts[2], "source": data.train_list or str(whole.root)}
        if not data.train_list and (whole.root.parent / "val").is_dir():
            record["unused_val"] = str(whole.root.parent / "val")  # a surprise worth a word
        return parts[0 if train else 1], record
    if train:
        return whole, None
    if data.val_list:
        if not data.train_list:
            raise DataError("data.val_list needs data.train_list (its classes); or use ROOT/val folders")
        return load_split(data, "val", whole.classes), None
    if data.train_list:
        raise DataError("data.train_list is set but neither data.val_list nor data.val_split; pass a val "
                        "list, or data.val_split=0.1 to hold out part of the train list")
    return load_split(data, "val"), None
