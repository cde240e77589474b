"""train.py end to end on the tiny preset: outputs, checkpoint contents, finished-run restart, eval-only on
our checkpoint, and SIGUSR1 -> one checkpoint, exit 75 -> resume that matches an uninterrupted run bitwise."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reliability_harness import child_env

from gcvit.engine.checkpoint import CheckpointManager
from gcvit.engine.distributed import PREEMPTED_EXIT_CODE
from gcvit_data.demo import ensure_demo_dataset

REPO = Path(__file__).resolve().parents[1]
ENV = child_env()


def _cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "debug=tiny", f"trainer.output_dir={run_dir}", *overrides]


def _train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(run_dir, *overrides), cwd=REPO, capture_output=True, text=True, timeout=240,
                          env=ENV)


def _last(run_dir: Path) -> dict:
    mgr = CheckpointManager(run_dir / "checkpoints")
    path = mgr.latest()
    assert path is not None, f"no checkpoint in {run_dir}"
    return mgr.load(path)


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("tiny")
    res = _train(run_dir, "logger.wandb.mode=offline")
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir, res


def test_tiny_run_writes_metrics_info_config_and_checkpoints(tiny_run) -> None:
    run_dir, res = tiny_run
    assert f"run dir: {run_dir}" in res.stdout
    train = _records(run_dir, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert {"epoch", "loss", "lr", "img_per_s"} <= r.keys() and r["lr"] > 0 and r["img_per_s"] > 0
    (ev,) = _records(run_dir, "eval")
    assert {"top1", "top5", "ema_top1", "ema_top5"} <= ev.keys() and 0 <= ev["top1"] <= ev["top5"] <= 100
    assert ev["count"] == sum(1 for _ in (ensure_demo_dataset() / "val").rglob("*.JPEG")) > 0
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["world_size"] == 1 and "torch" in info["packages"] and "git_commit" in info
    assert info["steps_per_epoch"] > 0 and info["accumulation"] == 2
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} >= {"last.pt", "best.pt"}
    state = _last(run_dir)
    assert {"model", "ema", "optimizer", "scaler", "schedule", "guard", "wandb", "progress", "loader", "rng",
            "config"} <= state.keys()
    assert state["progress"]["step"] == 4 and state["schedule"]["step"] == 4 and state["guard"]["steps"] == 4
    assert state["loader"]["position"] == 4 * 16 and len(state["rng"]) == 1
    assert state["config"]["name"] == "debug-tiny"
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")  # W&B offline: no network, the id is kept
    assert wandb_run.name.endswith(state["wandb"]["run_id"])
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])


def test_restarting_a_finished_run_exits_zero_at_once(tiny_run) -> None:
    run_dir, _ = tiny_run
    res = _train(run_dir)
    assert res.returncode == 0 and "already finished" in res.stdout
    assert [r["step"] for r in _records(run_dir, "train")] == [1, 2, 3, 4]


def test_eval_only_reproduces_the_training_eval(tiny_run) -> None:
    run_dir, _ = tiny_run
    ckpt = CheckpointManager(run_dir / "checkpoints").path("last")
    res = subprocess.run([*_cmd(run_dir), "mode=eval", f"checkpoint={ckpt}"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    (ev,) = _records(run_dir, "eval")
    lines = {ln.split()[1]: ln for ln in res.stdout.splitlines() if ln.startswith("eval ")}
    assert f"top1 {ev['top1']:.3f}  top5 {ev['top5']:.3f}  count {ev['count']}" in lines["model"]
    assert f"top1 {ev['ema_top1']:.3f}  top5 {ev['ema_top5']:.3f}" in lines["ema"]


def test_eval_only_on_a_timm_checkpoint_matches_timm(tmp_path: Path) -> None:
    from timm.models.gcvit import GlobalContextVit

    from gcvit_data.config import AugConfig, DataConfig
    from gcvit_data.loaders import build_loader

    torch.manual_seed(1)
    # dim 32: at 16 timm rounds the squeeze-excite width up to 8 channels where the official code has 4.
    ref = GlobalContextVit(num_classes=10, img_size=32, embed_dim=32, depths=(2, 2, 2, 2),
                           num_heads=(1, 1, 2, 2), window_size=(4, 4, 2, 1), mlp_ratio=2.0).eval()
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    res = subprocess.run([*_cmd(tmp_path / "run"), "mode=eval", "data.loader=torch", "model.overrides.dim=32",
                          f"checkpoint={tmp_path / 'timm.pth'}"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("eval model")]
    # timm's own model on the same val images, counted here independently of the trainer.
    data = DataConfig(root=str(ensure_demo_dataset()), loader="torch", batch_size=50, workers=1)
    hits = seen = 0
    with torch.no_grad():
        for batch in build_loader(data, AugConfig(), split="val", img_size=32, seed=0, rank=0, world_size=1,
                                  device=torch.device("cpu")):
            hits += int((ref(batch.images).argmax(-1) == batch.labels).sum())
            seen += len(batch.labels)
    assert f"top1 {100.0 * hits / seen:.3f}" in line and f"count {seen}" in line


@pytest.mark.slow
def test_sigusr1_saves_once_exits_75_and_resumes_bitwise(tmp_path: Path) -> None:
    args = ("trainer.max_steps=16", "trainer.deterministic=true", "trainer.ckpt_every_steps=0")
    ref = tmp_path / "ref"
    assert _train(ref, *args).returncode == 0
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run, *args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    deadline = time.time() + 180
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and _records(run, "train")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]  # exactly one save
    stopped = _last(run)["progress"]["step"]
    assert 1 <= stopped < 16 and f"saved step {stopped}" in out
    res = _train(run, *args)
    assert res.returncode == 0 and f"at step {stopped}" in res.stdout, res.stderr[-3000:]
    a, b = _last(ref), _last(run)
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k}"
    assert [r["step"] for r in _records(run, "train")] == list(range(1, 17))
    assert [r["loss"] for r in _records(run, "train")] == [r["loss"] for r in _records(ref, "train")]
