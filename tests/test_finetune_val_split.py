"""data.val_split: a held-out val set from ROOT/train that is stratified, deterministic and disjoint;
loaders and train.py use and record it; one-line errors."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from finetune_harness import FOLDERS, make_folder_dataset, train

from gcvit_data.config import AugConfig, DataConfig
from gcvit_data.index import DataError, Index
from gcvit_data.loaders import build_loader
from gcvit_data.split import describe, held_out

SIZES = {"a": 10, "b": 20, "c": 1, "d": 3}


def _index() -> Index:
    files, labels = [], []
    for y, (c, n) in enumerate(SIZES.items()):
        files += [f"{c}/{i:03d}.jpg" for i in range(n)]
        labels += [y] * n
    return Index(Path("/x/train"), list(SIZES), files, labels)


def test_split_is_stratified_disjoint_complete_and_seeded() -> None:
    index = _index()
    train, val, record = held_out(index, 0.1, seed=0)
    assert set(train.files).isdisjoint(val.files) and sorted(train.files + val.files) == sorted(index.files)
    # round(10%) of each class, at least one, but never a class's last training image
    assert Counter(f.split("/")[0] for f in val.files) == {"a": 1, "b": 2, "d": 1}
    assert all(f.startswith(f"{val.classes[y]}/") for f, y in zip(val.files, val.labels))
    assert record["train_images"] == 30 and record["val_images"] == 4 and record["seed"] == 0
    again = held_out(index, 0.1, seed=0)
    assert again[1].files == val.files and again[2] == record
    other = held_out(index, 0.1, seed=1)
    assert other[1].files != val.files and other[2]["val_files_sha1"] != record["val_files_sha1"]


def test_loaders_read_the_split_from_a_folder_without_val(tmp_path) -> None:
    root = make_folder_dataset(tmp_path / "data", {"train": 8})
    common = dict(img_size=32, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(DataError, match=r"val does not exist; .*data.val_split=0.1$"):
        build_loader(DataConfig(root=str(root), loader="torch"), AugConfig(), split="val", **common)
    data = DataConfig(root=str(root), loader="torch", batch_size=4, workers=1, val_split=0.25)
    tr = build_loader(data, AugConfig(), split="train", **common)
    va = build_loader(data, AugConfig(), split="val", **common)
    assert (tr.num_samples, va.num_samples) == (18, 6) and va.classes == tr.classes == sorted(FOLDERS)
    assert va.split_record == tr.split_record and va.split_record["val_images"] == 6
    assert va.split_record["source"] == str(root / "train") and "unused_val" not in va.split_record
    (root / "val" / "x").mkdir(parents=True)  # a val folder next to the split is left unused, and said so
    record = build_loader(data, AugConfig(), split="val", **common).split_record
    assert describe(record).endswith(f"recorded in run_info.json; {root / 'val'} is not used")
    labels = torch.cat([b.labels for b in va])
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]  # two of each class's eight


def test_train_py_makes_records_and_says_the_split(tmp_path) -> None:
    root = make_folder_dataset(tmp_path / "data", {"train": 12})
    run_dir = tmp_path / "run"
    res = train(run_dir, f"data.root={root}", "data.loader=torch", "data.val_split=0.25",
                "trainer.max_steps=1")
    assert res.returncode == 0, res.stderr[-3000:]
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("val split: ")]
    assert line == (f"val split: held out 9 of 36 images of {root}/train (25% of each of 3 classes, seed 0); "
                    "27 train on; recorded in run_info.json")
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["val_split"]["val_images"] == 9 and info["val_split"]["fraction"] == 0.25
    (ev,) = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in r]
    assert ev["count"] == 9
    bad = train(tmp_path / "bad", f"data.root={root}", "data.val_split=1.5")
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith(
        "config error: data.val_split=1.5 is invalid; allowed: null or a fraction in (0, 1)")
