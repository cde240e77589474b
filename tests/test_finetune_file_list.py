"""data.train_list / data.val_list: CSV or TSV `path,label` files with class names or integer labels, read by
the loaders and train.py; each bad input is one line naming the file and row."""
from __future__ import annotations

import json
import re

import pytest
import torch
from finetune_harness import make_folder_dataset, train

from gcvit_data.config import AugConfig, DataConfig
from gcvit_data.index import DataError
from gcvit_data.loaders import build_loader
from gcvit_data.readers.file_list import read_list

CLASSES = {"apple pie": "00_circle", "Bolt-2": "03_cross"}


@pytest.fixture
def images(tmp_path):
    """tmp/imgs/{train,val}/<name>/*.JPEG and the relative paths of each split, class by class."""
    root = make_folder_dataset(tmp_path / "imgs", {"train": 6, "val": 2}, CLASSES)
    return root, {s: sorted(str(p.relative_to(root)) for p in (root / s).rglob("*.JPEG"))
                  for s in ("train", "val")}


def _write(path, rows, sep=",", header=True) -> str:
    lines = ([f"path{sep}label"] if header else []) + [f"{p}{sep}{y}" for p, y in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_names_csv_and_integer_tsv_give_the_same_labels(images, tmp_path) -> None:
    root, files = images
    named = [(f, f.split("/")[1]) for f in files["train"]]
    csv = _write(root / "train.csv", named)  # relative to the list's folder
    index = read_list(csv, "data.train_list")
    assert index.classes == ["Bolt-2", "apple pie"] and len(index) == 12
    assert [index.classes[y] for y in index.labels] == [y for _, y in named]
    ints = [(str(root / f), index.classes.index(y)) for f, y in named]
    tsv = _write(tmp_path / "train.tsv", ints, sep="\t", header=False)  # absolute paths, no header
    by_int = read_list(tsv, "data.train_list")
    assert by_int.classes == ["0", "1"] and by_int.labels == index.labels
    assert [by_int.path(i) for i in range(12)] == [index.path(i) for i in range(12)]


def test_loaders_and_train_py_read_the_lists(images, tmp_path) -> None:
    root, files = images
    train_csv = _write(tmp_path / "train.csv", [(f, f.split("/")[1]) for f in files["train"]])
    val_csv = _write(tmp_path / "val.csv", [(f, f.split("/")[1]) for f in files["val"]])
    data = DataConfig(root=str(root), loader="torch", batch_size=4, workers=1, train_list=train_csv,
                      val_list=val_csv)
    val = build_loader(data, AugConfig(), split="val", img_size=32, seed=0, rank=0, world_size=1,
                       device=torch.device("cpu"))
    assert val.classes == ["Bolt-2", "apple pie"] and val.num_samples == 4
    assert sorted(torch.cat([b.labels for b in val]).tolist()) == [0, 0, 1, 1]
    held = build_loader(DataConfig(**{**data.__dict__, "val_list": None, "val_split": 0.5}), AugConfig(),
                        split="val", img_size=32, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    assert held.num_samples == 6 and held.split_record["source"] == train_csv  # half of each class's six

    run_dir = tmp_path / "run"
    res = train(run_dir, f"data.root={root}", "data.loader=torch", f"data.train_list={train_csv}",
                f"data.val_list={val_csv}", "trainer.max_steps=1", "trainer.global_batch_size=8")
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["classes"] == ["Bolt-2", "apple pie"]
    (ev,) = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in r]
    assert ev["count"] == 4


def test_bad_lists_are_one_line(images, tmp_path) -> None:
    root, files = images
    good = _write(tmp_path / "train.csv", [(f, f.split("/")[1]) for f in files["train"]])
    base = DataConfig(root=str(root), loader="torch", batch_size=4, workers=1, train_list=good)

    def load(split: str = "train", **kw):
        data = DataConfig(**{**base.__dict__, **kw})
        return build_loader(data, AugConfig(), split=split, img_size=32, seed=0, rank=0, world_size=1,
                            device=torch.device("cpu"))

    cases = [
        (dict(train_list=str(tmp_path / "none.csv")), "train", r"data.train_list=\S+none.csv does not exist"),
        (dict(train_list=_write(tmp_path / "bad.csv", [("a,b", "c")])), "train",
         r"bad.csv line 2: expected 2 fields `path,label`, got 3: 'a,b,c'"),
        (dict(train_list=_write(tmp_path / "gone.csv", [("nope1.jpg", "x"), (files["train"][0], "y"),
                                                      ("nope2.jpg", "x")])), "train",
         r"gone.csv: 2 listed images do not exist, the first on line 2: \S+nope1.jpg \(paths are relative "),
        (dict(val_list=_write(tmp_path / "val.csv", [(files["val"][0], "Bolt-2"), (files["val"][1], "x")])),
         "val", r"val.csv line 3: label 'x' is not a class of data.train_list \(2 classes: Bolt-2, apple "),
        ({}, "val", r"data.train_list is set but neither data.val_list nor data.val_split"),
        (dict(train_list=None, val_list=good), "val", r"data.val_list needs data.train_list"),
    ]
    for kw, split, message in cases:
        with pytest.raises(DataError) as info:
            load(split, **kw)
        text = str(info.value)
        assert "\n" not in text and text.startswith("data error: "), text
        assert re.search(message, text), (message, text)
