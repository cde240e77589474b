"""python -m gcvit.predict: our run checkpoints print their own class names with the probabilities of the
val pipeline; official/timm 1000-class files print ImageNet names, also at another resolution; one-line
errors; by default the weights that earned a run's best."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from finetune_harness import ENV, HUB_NAME, REPO, hub_env, make_folder_dataset, train, write_hub_cache
from PIL import Image
from timm.data import ImageNetInfo

import gcvit
from gcvit.engine.pretrained import read
from gcvit.models.checkpoint import from_native
from gcvit.predict import main
from gcvit_data.config import AugConfig, DataConfig
from gcvit_data.loaders import build_loader

ARCH = dict(dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), window_size=(4, 4, 2, 1), mlp_ratio=2.0)
NAMES = ["Bolt-2", "apple pie", "zebra_stripes"]


def _images(root, n: int = 5):
    """n random RGB images of assorted sizes under root/val/<class>/ (an ImageFolder the val loader reads)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "val" / NAMES[i % 3]
        d.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (40 + 7 * i, 48 + 5 * i, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / f"img{i}.png")
    for c in NAMES:
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / c / "x.png")
    return root


@pytest.fixture
def run_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = gcvit.create_model("gcvit_xxtiny", num_classes=3, img_size=32, **ARCH)
    ema = gcvit.create_model("gcvit_xxtiny", num_classes=3, img_size=32, **ARCH)
    config = {"model": {"name": "gcvit_xxtiny", "img_size": 32, "overrides": ARCH},
              "data": {"crop_pct": 0.875, "interpolation": "bicubic"}}
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "progress": {"step": 1},
                "config": config, "classes": NAMES}, tmp_path / "last.pt")
    return tmp_path / "last.pt", ema.eval()


def test_run_checkpoint_prints_its_class_names_and_the_val_pipelines_probabilities(run_checkpoint, tmp_path,
                                                                                   capsys) -> None:
    ckpt, ema = run_checkpoint
    root = _images(tmp_path / "data")
    assert main([str(ckpt), str(root / "val"), "--topk", "2", "--json", "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # the val loader of training, on the same files, gives the reference probabilities (EMA weights)
    data = DataConfig(root=str(root), loader="torch", batch_size=8, workers=1)
    batch = next(iter(build_loader(data, AugConfig(), split="val", img_size=32, seed=0, rank=0, world_size=1,
                                   device=torch.device("cpu"))))
    with torch.no_grad():
        ref = ema(batch.images).softmax(-1)
    by_id = [p for c in sorted(NAMES) for p in sorted((root / "val" / c).iterdir())]  # the val index order
    expected = {str(by_id[int(i)]): ref[j] for j, i in enumerate(batch.ids)}
    assert [r["image"] for r in rows] == sorted(expected)  # directories are walked in sorted order
    for row in rows:
        probs, idx = expected[row["image"]].topk(2)
        assert [t["name"] for t in row["top"]] == [NAMES[j] for j in idx.tolist()]
        assert [t["prob"] for t in row["top"]] == pytest.approx(probs.tolist(), abs=1e-5)


def test_timm_checkpoint_gets_imagenet_names_at_another_resolution(tmp_path) -> None:
    torch.manual_seed(0)
    model = gcvit.create_model("gcvit_xxtiny", img_size=64, dim=16, depths=(2, 2, 2, 2),
                               num_heads=(1, 1, 2, 2))
    torch.save({"state_dict": from_native(model.state_dict(), "timm")}, tmp_path / "timm.pth")
    _images(tmp_path / "data", n=3)
    # the module entry point, at twice the resolution: windows 2, 2, 4, 2 -> 4, 4, 8, 4
    res = subprocess.run([sys.executable, "-m", "gcvit.predict", str(tmp_path / "timm.pth"),
                          str(tmp_path / "data" / "val"), "--img-size", "128", "--topk", "3"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert len(lines) == 3
    names = {ImageNetInfo().index_to_description(i).split(",")[0] for i in range(1000)}
    for line in lines:
        path, top = line.split(": ", 1)
        assert path.endswith(".png")
        parts = [p.rsplit(" ", 1) for p in top.split(", ")]
        assert len(parts) == 3 and all(name in names for name, _ in parts)
        probs = [float(q) for _, q in parts]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.001


def test_bad_inputs_are_one_line(run_checkpoint, tmp_path, capsys) -> None:
    ckpt, _ = run_checkpoint
    with pytest.raises(SystemExit, match=r"^error: \S+nope does not exist; pass image files or directories"):
        main([str(ckpt), str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"^error: no images \(\*\.jpeg, \*\.jpg, \*\.png\) under "):
        main([str(ckpt), str(tmp_path / "empty")])
    root = _images(tmp_path / "data", n=1)
    assert main([str(tmp_path / "missing.pt"), str(root)]) == 1
    assert main([str(ckpt), str(root), "--img-size", "48"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"error: checkpoint={tmp_path / 'missing.pt'}: no such file")
    assert err[1].startswith("error: --img-size 48 scales the windows (4, 4, 2, 1) of 32 px to ")
    (root / "val" / NAMES[0] / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=r"^error: cannot decode \S+broken.png"):
        main([str(ckpt), str(root / "val")])


def _predicted_top1(capsys, ckpt: Path, val: Path) -> tuple[float, str]:
    """gcvit.predict's top-1 on the val folder (by its folder names) with the default weights, and its
    line saying which weights."""
    capsys.readouterr()
    assert main([str(ckpt), str(val), "--json", "--topk", "1"]) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    correct = sum(r["top"][0]["name"] == Path(r["image"]).parent.name for r in rows)
    return 100.0 * correct / len(rows), out.err.strip()


@pytest.mark.slow
def test_predict_takes_the_weights_that_earned_best_when_the_ema_lags(tmp_path, capsys) -> None:
    """Issue 25's case, small: fine-tuning from timm-format weights with the in1k recipe's EMA (decay 0.9998,
    no warmup) for 30 steps, evaluated at steps 12, 24 and 30. The EMA barely leaves the start while the
    model learns; best.pt follows the better of the two and predict, by default, reproduces the top-1 the
    run logged for it; every other file says what it scored itself (or that it was not evaluated)."""
    hf_home = tmp_path / "hf"
    write_hub_cache(hf_home)
    data = make_folder_dataset(tmp_path / "data", {"train": 32, "val": 20}, gray=True)
    res = train(tmp_path / "run", f"data.root={data}", f"model.pretrained={HUB_NAME}", "data.loader=torch",
                "trainer.max_steps=null", "sched.epochs=5", "trainer.eval_every_epochs=2",
                "trainer.ckpt_every_steps=4", "trainer.ema_decay=0.9998", "trainer.ema_warmup=false",
                env=hub_env(hf_home))
    assert res.returncode == 0, res.stderr[-3000:]
    assert ("EMA: trainer.ema_decay=0.9998 averages over ~5000 steps, more than half of this run's 30, so "
            "its weights lag the model's") in res.stdout
    assert "set trainer.ema_warmup=true or trainer.ema_decay=" in res.stdout
    records = map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    evals = {r["step"]: r for r in records if r["kind"] == "eval"}
    assert sorted(evals) == [12, 24, 30]
    ev = evals[30]
    assert ev["top1"] >= ev["ema_top1"] + 20, ev  # the case: the model far ahead of its lagging EMA
    ckpts = tmp_path / "run" / "checkpoints"
    best = torch.load(ckpts / "best.pt", weights_only=True)
    progress, scored = best["progress"], best["scored"]
    assert progress["best_weights"] == scored["weights"] == "model"
    assert progress["best_top1"] == scored["top1"] == evals[scored["step"]]["top1"]
    assert read(ckpts / "best.pt").weights == "model" and read(ckpts / "best.pt", "ema").weights == "ema"
    top1, line = _predicted_top1(capsys, ckpts / "best.pt", data / "val")
    assert top1 == pytest.approx(progress["best_top1"])
    assert line.startswith(f"weights: {ckpts / 'best.pt'}: its model weights; the model weights earned the "
                           f"run's best top-1 ({progress['best_top1']:.2f})")

    # last.pt claims only its own evaluation (step 30) and delivers it
    own = ("ema", ev["ema_top1"]) if ev["ema_top1"] >= ev["top1"] else ("model", ev["top1"])  # a tie: EMA
    assert torch.load(ckpts / "last.pt", weights_only=True)["scored"] == {"step": 30, "weights": own[0],
                                                                          "top1": own[1]}
    top1, line = _predicted_top1(capsys, ckpts / "last.pt", data / "val")
    assert top1 == pytest.approx(own[1]) and f"its {own[0]} weights; the {own[0]} weights " in line
    # a periodic save between evaluations claims no score of its own
    then = torch.load(ckpts / "step000000028.pt", weights_only=True)["progress"]
    step28 = read(ckpts / "step000000028.pt")
    assert step28.weights == then["best_weights"] == "model" and step28.notes == [
        "this checkpoint (step 28) records no evaluation of its own: the model weights, the set that earned "
        f"the run's best top-1 up to then ({then['best_top1']:.2f}; see best.pt); the ema weights on request"]
