"""mode=eval over val, ReaL, V2, A, R and Sketch with 2 gloo ranks: each set's rule, every image once, the
results file and table; then an external set alone at another resolution."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from reliability_harness import train

import gcvit
from gcvit_data.eval_sets import timm_info

WNIDS = timm_info("imagenet_synsets.txt").split()
A = timm_info("imagenet_a_synsets.txt").split()
R = timm_info("imagenet_r_synsets.txt").split()
ARCH = dict(  # debug=tiny's model with one block per stage
    dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=[4, 4, 2, 1], mlp_ratio=2)
# Every image is predicted as BIG over all 1000 classes, and as A0 / R0 among the 200 of A / R: the head's
# bias decides, so each set's top-1 is known from its layout alone.
BIG = next(i for i, w in enumerate(WNIDS) if w not in A and w not in R)
A0 = next(w for w in A if w not in R)  # A and R share classes: each favourite must be outside the other
R0 = next(w for w in R if w not in A)
A1, R1 = next(w for w in A if w != A0), next(w for w in R if w != R0)  # classes never predicted
BIAS = {BIG: 60.0, WNIDS.index(A0): 50.0, WNIDS.index(R0): 50.0}


def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        Image.new("RGB", (40, 36), (20 * i, 90, 200 - 20 * i)).save(folder / n, quality=90)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sets")
    imagenet = root / "imagenet"
    for w in WNIDS:  # the class list of the val index comes from the train folders' names
        (imagenet / "train" / w).mkdir(parents=True)
    val_names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 8)]
    _images(imagenet / "val" / WNIDS[BIG], val_names[:2])
    _images(imagenet / "val" / A1, val_names[2:5])
    _images(imagenet / "val" / R1, val_names[5:])
    # ReaL sets by file number: 2 is empty (left out); 1, 3 and 6 hold BIG (3 and 6 besides other labels)
    real = [[BIG], [], [BIG, 5], [7], [8], [BIG, 9], [WNIDS.index(R1)]]
    (root / "real.json").write_text(json.dumps(real))
    for cls, n in ((str(BIG), 2), ("3", 1), ("10", 1)):
        _images(root / "v2" / cls, [f"{cls}_{i}.jpeg" for i in range(n)])
    _images(root / "a" / A0, ["a0.jpg"])
    _images(root / "a" / A1, ["a1.jpg", "a2.jpg"])
    _images(root / "r" / R0, ["r0.jpg", "r1.jpg"])
    _images(root / "sketch" / WNIDS[BIG], ["s0.JPEG"])
    _images(root / "sketch" / A1, ["s1.JPEG", "s2.JPEG", "s3.JPEG"])
    model = gcvit.create_model("gcvit_xxtiny", img_size=32, num_classes=1000, **ARCH)
    with torch.no_grad():
        model.head.bias.zero_()
        for c, b in BIAS.items():
            model.head.bias[c] = b
    torch.save(model.state_dict(), root / "weights.pth")
    return {"root": root, "imagenet": imagenet}


def _overrides(layout: dict[str, Path], *extra: str) -> list[str]:
    root = layout["root"]
    return ["mode=eval", "debug=tiny", "model.overrides.depths=[1,1,1,1]", "data.batch_size=2",
            f"checkpoint={root / 'weights.pth'}", f"data.root={layout['imagenet']}",
            f"eval.real_labels={root / 'real.json'}",
            *(f"eval.{name}_root={root / name}" for name in ("v2", "a", "r", "sketch")), *extra]


def test_every_set_scored_by_its_rule_on_two_ranks(layout: dict[str, Path], tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    run = train(tmp_path / "run", *_overrides(layout, "eval.sets=[val,real,v2,a,r,sketch]",
                                              f"eval.results_file={results}"), nproc=2)
    report = json.loads(results.read_text())
    rows = {r["set"]: r for r in report["results"]}
    # (top-1, images scored): val 2 of 7 are BIG; ReaL 3 of 6 sets hold BIG; V2 2 of 4 in folder BIG; A and R
    # restricted to their 200 classes predict A0 / R0 (over all 1000 it would be BIG, never right there)
    want = {"val": (200 / 7, 7), "real": (50.0, 6), "v2": (50.0, 4), "a": (100 / 3, 3), "r": (100.0, 2),
            "sketch": (25.0, 4)}
    for name, (top1, count) in want.items():
        assert rows[name]["top1"] == pytest.approx(top1) and rows[name]["count"] == count, rows[name]
        assert rows[name]["top5"] >= rows[name]["top1"] and rows[name]["weights"] == "model"
    assert rows["val"]["img_per_s"] > 0  # 2 batches on each rank: the first (warm-up) is not timed
    assert rows["real"]["excluded"] == 1 and "200 classes" in rows["a"]["protocol"]
    assert rows["val"]["per_class"][WNIDS[BIG]] == {"top1": 100.0, "count": 2}
    assert 0 <= rows["val"]["ece"] <= 1
    assert report["world_size"] == 2 and report["img_size"] == 32 and report["crop_pct"] == 0.875
    assert len(report["sha256"]) == 64 and report["checkpoint"].endswith("weights.pth")
    out = run.out(0)
    assert out.count("\nval ") == 1 and f"results: {results}" in out  # the summary table, once, by rank 0
    assert "eval" not in run.out(1)


def test_an_external_set_alone_needs_no_data_root_and_runs_at_another_resolution(
        layout: dict[str, Path], tmp_path: Path) -> None:
    args = [a for a in _overrides(layout, "eval.sets=[v2]")
            if not a.startswith(("data.root", "model.img_size"))]
    run = train(tmp_path / "run", *args, "model.img_size=64", "logger.wandb.mode=offline",
                "model.overrides.window_size=[8,8,4,2]")  # tables of windows 4, 4, 2, 1 resampled
    report = json.loads((tmp_path / "run" / "eval" / "weights.json").read_text())
    (row,) = report["results"]
    assert (row["set"], row["count"], report["img_size"]) == ("v2", 4, 64)
    assert "v2" in run.out(0)
    (table,) = (tmp_path / "run" / "wandb").glob("offline-run-*/files/media/table/eval_*.table.json")
    logged = json.loads(table.read_text())  # the W&B table holds the printed rows
    assert logged["columns"][:3] == ["set", "weights", "top1"]
    assert logged["data"][0][:3] == ["v2", "model", row["top1"]]
