"""Fine-tuning through train.py: a run starts from Hub weights by name (offline, from the Hub cache); its
checkpoint starts a run on another ImageFolder (other class names and count) at another resolution; the run
records it, stores its class names, and resumes from its own checkpoints (not the starting weights) when
restarted; `checkpoint=` in train mode is one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from finetune_harness import ENV, FOLDERS, HUB_NAME, REPO, hub_env, make_folder_dataset, train
from finetune_harness import write_hub_cache as write_hub

from gcvit.engine.checkpoint import CheckpointManager


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run from timm-format weights named on the Hub (debug=tiny's model; HF_HUB_OFFLINE=1, cache only)."""
    run_dir = tmp_path_factory.mktemp("source")
    hf_home = tmp_path_factory.mktemp("hf")
    snapshot = write_hub(hf_home)
    res = train(run_dir, f"model.pretrained={HUB_NAME}", env=hub_env(hf_home))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (f"pretrained: {HUB_NAME} ({snapshot}) (timm format, plain weights); an initialisation: "
            "optimizer, schedule and data start fresh") in res.stdout.splitlines()
    return run_dir


def _first_step(run_dir: Path) -> dict:
    """Loss and gradient norm of the run's first logged step."""
    first = next(r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                 if r["kind"] == "train")
    assert first["step"] == 1
    return {k: first[k] for k in ("loss", "grad_norm")}


def test_a_run_from_the_hub_name_starts_as_one_from_its_file(pretrained_run, tmp_path) -> None:
    start = json.loads((pretrained_run / "run_info.json").read_text())["pretrained"]
    assert start["hub"] == HUB_NAME and Path(start["path"]).name == "model.safetensors"
    assert start["format"] == "timm" and not any("head re-initialised" in line for line in start["log"])
    by_path = train(tmp_path / "by_path", f"model.pretrained={start['path']}", "trainer.max_steps=1")
    assert by_path.returncode == 0, by_path.stderr[-3000:]
    assert _first_step(tmp_path / "by_path") == _first_step(pretrained_run)  # bit for bit: the same start


@pytest.fixture(scope="module")
def finetuned(pretrained_run, tmp_path_factory: pytest.TempPathFactory):
    """Two steps from the source's last checkpoint on a 3-class folder dataset at 64 px."""
    tmp_path = tmp_path_factory.mktemp("finetune")
    root = make_folder_dataset(tmp_path / "data", {"train": 12, "val": 4})
    src = CheckpointManager(pretrained_run / "checkpoints").path("last")
    # 64 px with windows doubled (debug=tiny runs at 32 px with windows 4, 4, 2, 1)
    args = (f"data.root={root}", "data.loader=torch", f"model.pretrained={src}", "model.img_size=64",
            "model.overrides.window_size=[8,8,4,2]")
    run_dir = tmp_path / "ft"
    return run_dir, src, args, train(run_dir, *args, "trainer.max_steps=2")


def test_fine_tune_from_a_run_checkpoint_on_other_classes_and_resolution(finetuned) -> None:
    run_dir, src, args, res = finetuned
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout.splitlines()
    assert (f"pretrained: {src} (native format, ema weights); an initialisation: optimizer, schedule and "
            "data start fresh") in out
    assert "head re-initialised: checkpoint has 10 classes, this dataset has 3" in out
    assert ("resolution: 8 relative-position tables resampled (bicubic) from windows (4, 4, 2, 1) to "
            "(8, 8, 4, 2) for 64 px") in out
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["pretrained"]["path"] == str(src) and info["pretrained"]["weights"] == "ema"
    assert info["classes"] == sorted(FOLDERS)
    mgr = CheckpointManager(run_dir / "checkpoints")
    state = mgr.load(mgr.latest())
    assert state["classes"] == sorted(FOLDERS) and state["progress"]["step"] == 2
    # the source's EMA backbone is where training started: the stem moved only by two small steps
    stem = torch.load(src, weights_only=True)["ema"]["stem.weight"]
    assert (state["model"]["stem.weight"] - stem).abs().max() < 0.05

    again = train(run_dir, *args, "trainer.max_steps=4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {mgr.path('last')} at step 2" in again.stdout
    assert "pretrained:" not in again.stdout  # the run's own checkpoint takes precedence


def test_checkpoint_in_train_mode_points_to_model_pretrained(tmp_path) -> None:
    res = train(tmp_path / "run", "checkpoint=/some/weights.pth")
    assert res.returncode != 0
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("config error: checkpoint='/some/weights.pth' is invalid")
    assert "model.pretrained=PATH" in line


def test_missing_pretrained_file_is_one_line(tmp_path) -> None:
    res = train(tmp_path / "run", f"model.pretrained={tmp_path / 'nope.pth'}")
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: model.pretrained={tmp_path / 'nope.pth'}: no such file; pass an official NVlabs, timm or "
        "gcvit-train checkpoint (.pth/.pt/.safetensors), hf-hub:ORG/REPO or timm:MODEL.TAG")


def test_eval_names_the_classes_and_refuses_another_class_set(finetuned, pretrained_run) -> None:
    run_dir, _, args, _ = finetuned
    ckpt = CheckpointManager(run_dir / "checkpoints").path("last")
    res = train(run_dir, *args, "mode=eval", f"checkpoint={ckpt}")
    assert res.returncode == 0, res.stderr[-3000:]
    # last.pt records its own evaluation (at the run's end), and the line claims that, not the run's best
    state = torch.load(ckpt, weights_only=True)
    step = state["progress"]["step"]
    (ev,) = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval" and r["step"] == step]
    which = "ema" if ev["ema_top1"] >= ev["top1"] else "model"
    top1 = ev["ema_top1" if which == "ema" else "top1"]
    assert state["scored"] == {"step": step, "weights": which, "top1": top1}
    (says,) = [ln for ln in res.stdout.splitlines() if ln.startswith("eval: predict, export and model.")]
    assert says.startswith(f"eval: predict, export and model.pretrained take the {which} weights of {ckpt}: "
                           f"the {which} weights ") and f"{top1:.2f}" in says
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("  lowest top1 by class (model): ")]
    names = [part.rsplit(" ", 2)[0] for part in line.split(": ", 1)[1].split(", ")]
    assert sorted(names) == sorted(FOLDERS)  # 3 classes with val images: all listed, by their folder names
    assert all(part.endswith("(4)") for part in line.split(": ", 1)[1].split(", "))
    other = train(pretrained_run, "mode=eval", "data.loader=torch", "model.img_size=64",
                  "model.overrides.window_size=[8,8,4,2]", f"checkpoint={ckpt}")
    assert other.returncode != 0
    (err,) = other.stderr.strip().splitlines()
    assert err.startswith(f"config error: {ckpt} was trained on 3 classes that are not ")
    assert "(class 0: 'Bolt-2' vs '00_circle')" in err and "model.pretrained" in err


def _assert_frozen_bitwise(run_dir: Path, src: Path, frozen: tuple[str, ...]) -> dict:
    """The run's model and EMA equal the starting EMA weights bit for bit on `frozen`, and moved elsewhere."""
    start = torch.load(src, weights_only=True)["ema"]
    mgr = CheckpointManager(run_dir / "checkpoints")
    state = mgr.load(mgr.latest())
    names = [k for k in start if k.startswith(frozen)]
    assert names and all(torch.equal(state[w][k], start[k]) for w in ("model", "ema") for k in names)
    assert any(not torch.equal(state["model"][k], start[k]) for k in start if not k.startswith(frozen))
    return state


def test_frozen_prefix_stays_bitwise_over_training(pretrained_run, tmp_path) -> None:
    src = CheckpointManager(pretrained_run / "checkpoints").path("last")
    res = train(tmp_path / "frozen", f"model.pretrained={src}", "model.freeze=stage2", "trainer.max_steps=3",
                "optim.layer_decay=0.8")
    assert res.returncode == 0, res.stderr[-3000:]
    assert any(ln.startswith("frozen (stage2): ") for ln in res.stdout.splitlines())
    assert ("layer decay 0.8: 10 layers (stem, each block, head); lr x 0.134 at the stem rising to x 1 at "
            "the head") in res.stdout.splitlines()
    frozen = ("stem.", "stem_reduce.", "stages.0.", "stages.1.", "stages.2.downsample.")
    state = _assert_frozen_bitwise(tmp_path / "frozen", src, frozen)
    trainable = [k for k in state["model"] if not k.startswith(frozen)]
    assert len(state["optimizer"]["state"]) == len(trainable)  # AdamW holds moments for trained tensors only


@pytest.mark.slow
def test_linear_probe_under_ddp_keeps_the_backbone_bitwise(pretrained_run, tmp_path) -> None:
    src = CheckpointManager(pretrained_run / "checkpoints").path("last")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train.py"), "debug=tiny", f"trainer.output_dir={tmp_path / 'probe'}",
           f"model.pretrained={src}", "model.freeze=backbone", "trainer.max_steps=2"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "get no gradient" not in res.stdout  # frozen tensors are not DDP's unused parameters
    state = _assert_frozen_bitwise(tmp_path / "probe", src, ("stem.", "stem_reduce.", "stages.", "norm."))
    assert len(state["optimizer"]["state"]) == 2  # head weight and bias
