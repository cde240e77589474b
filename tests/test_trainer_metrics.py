"""metrics.jsonl bookkeeping, W&B offline with a stable run id, run_info, and the plot command."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import gcvit
from gcvit import plot
from gcvit.engine import metrics, mfu, provenance
from gcvit.engine.wandb_logger import WandbLogger


def _records() -> list[dict]:
    train = [{"kind": "train", "step": s, "epoch": s // 4, "loss": 5.0 / s, "lr": 1e-3 * s,
              "img_per_s": 100.0 + s} for s in range(1, 9)]
    evals = [{"kind": "eval", "step": s, "epoch": s // 4 - 1, "top1": 10.0 * s, "top5": 12.0 * s,
              "ema_top1": 9.0 * s, "ema_top5": 11.0 * s, "count": 50} for s in (4, 8)]
    return train + evals


def test_writer_appends_and_truncates_for_resume(tmp_path: Path) -> None:
    w = metrics.MetricsWriter(tmp_path, enabled=True)
    for r in _records():
        w.write(r)
    w.truncate_after(5)  # a run resumed from step 5 recomputes 6..8
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 4]
    metrics.MetricsWriter(tmp_path / "nothing", enabled=False).write({"step": 1})
    assert not (tmp_path / "nothing").exists()


def test_plot_renders_png(tmp_path: Path) -> None:
    w = metrics.MetricsWriter(tmp_path, enabled=True)
    for r in _records():
        w.write(r)
    out = plot.plot(tmp_path)
    assert out == tmp_path / "curves.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000  # four panels with curves, not an empty canvas


def test_wandb_offline_keeps_run_id_across_restart(tmp_path: Path) -> None:
    first = WandbLogger("offline", "gcvit-test", None, tmp_path, enabled=True)
    first.start("run", {"optim": {"lr": 1e-3}})
    first.log({"loss": 1.0, "note": "skipped: not a number"}, step=1)
    first.finish()
    second = WandbLogger("offline", "gcvit-test", None, tmp_path, enabled=True)
    second.load_state_dict(first.state_dict())
    second.start("run", {"optim": {"lr": 1e-3}})
    second.finish()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(first.run_id in p.name for p in runs)  # same second: wandb adds "-1"
    assert (runs[0] / f"run-{first.run_id}.wandb").stat().st_size > 0


def test_wandb_disabled_and_non_main_ranks_touch_nothing(tmp_path: Path) -> None:
    for mode, main in (("disabled", True), ("offline", False)):
        w = WandbLogger(mode, "p", None, tmp_path, enabled=main)
        w.start("x", {})
        w.log({"loss": 1.0}, step=1)
        w.finish()
    assert not (tmp_path / "wandb").exists()


def test_gcvit_flops_count_every_gemm_whatever_the_caller_s_grad_mode() -> None:
    """28.57 GFLOP per gcvit_tiny image for a train step: the attention GEMMs included, also when called under
    no_grad (where the CPU attention would take SDPA's fused kernel, which FlopCounterMode does not count)."""
    model = gcvit.create_model("gcvit_tiny")
    with torch.no_grad():
        flops = mfu.train_flops_per_image(model, 224, torch.device("cpu"))
    assert flops == pytest.approx(28.566e9, rel=1e-4)


def test_run_info_and_flops() -> None:
    info = metrics.run_info(1, torch.device("cpu"), {"lr": 0.1})
    assert info["world_size"] == 1 and info["lr"] == 0.1 and "torch" in info["packages"]
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    assert mfu.train_flops_per_image(net, 8, torch.device("cpu")) == 3 * 2 * 3 * 8 * 8 * 10
    assert mfu.peak_flops(torch.device("cpu"), "bf16") is None


def test_run_info_and_a_measurement_name_the_same_commit(monkeypatch) -> None:
    """One commit for run_info.json, eval reports and benchmark JSONs: this checkout's HEAD, or GCVIT_COMMIT
    where a copy has no .git (the GPU kit)."""
    monkeypatch.delenv("GCVIT_COMMIT", raising=False)
    head = provenance.git_commit()
    assert head is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", head)  # None: a copy without .git
    cpu = torch.device("cpu")
    assert metrics.run_info(1, cpu)["git_commit"] == provenance.environment(cpu)["commit"] == head
    monkeypatch.setenv("GCVIT_COMMIT", "abc123")
    assert metrics.run_info(1, cpu)["git_commit"] == provenance.environment(cpu)["commit"] == "abc123"


@pytest.mark.parametrize(("name", "bf16", "fp32"), [
    ("NVIDIA H100 80GB HBM3", 989.0, 494.5),  # SXM
    ("NVIDIA H100 PCIe", 756.0, 378.0),
    ("NVIDIA H100 NVL", 835.0, 417.5),
    ("NVIDIA H200", 989.0, 494.5),
    ("NVIDIA H200 NVL", 835.0, 417.5),
    ("NVIDIA GH200 480GB", 989.0, 494.5),
    ("NVIDIA A100-SXM4-80GB", 312.0, 156.0),
    ("NVIDIA A100 80GB PCIe", 312.0, 156.0),
    ("NVIDIA A10", 125.0, 62.5),
    ("NVIDIA A10G", None, None),  # a different chip than the A10: no figure rather than a wrong one
    ("NVIDIA H800", None, None),
    ("NVIDIA GeForce RTX 4090", None, None),
])
def test_peak_tflops_by_gpu_name(name: str, bf16: float | None, fp32: float | None) -> None:
    assert mfu.peak_tflops(name, "bf16") == bf16 and mfu.peak_tflops(name, "fp16") == bf16
    assert mfu.peak_tflops(name, "fp32") == fp32


def test_mfu_is_logged_as_null_without_a_known_peak() -> None:
    window = metrics.Window(torch.device("cpu"))
    window.add(torch.tensor(2.0), 0.0)
    common = dict(step=1, epoch=0, lr=1e-3, grad_norm=1.0, global_batch=8, world_size=1)
    assert window.record(**common, flops_per_image=1e9, peak=None)["mfu"] is None
    window.add(torch.tensor(2.0), 0.0)
    rec = window.record(**common, flops_per_image=1e9, peak=1e12)
    assert rec["mfu"] == pytest.approx(rec["img_per_s"] * 1e9 / 1e12)


def test_compile_warm_up_is_left_out_of_img_per_s(monkeypatch: pytest.MonkeyPatch) -> None:
    # a fake perf_counter, read at: window start, restart, record + new window, restart, record + new window
    clock = iter([0.0, 100.0, 101.0, 101.0, 130.0, 132.0, 132.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    window = metrics.Window(torch.device("cpu"))  # t0 = 0
    common = dict(epoch=0, lr=1e-3, grad_norm=1.0, global_batch=8, world_size=1, flops_per_image=1e9,
                  peak=1e12)
    window.add(torch.tensor(2.0), 0.0)
    window.restart_clock()  # t0 = 100: what the loop does after each warm-up step of a compiled run
    rec = window.record(step=1, **common)  # at 101, then a fresh window at 101
    assert rec["img_per_s"] is None and rec["mfu"] is None and rec["loss"] == 2.0  # the loss still counts
    window.add(torch.tensor(1.0), 0.0)
    window.restart_clock()  # t0 = 130
    window.add(torch.tensor(3.0), 0.0)
    rec = window.record(step=3, **common)  # at 132: one timed step of 8 images in 2 s
    assert rec["loss"] == 2.0 and rec["img_per_s"] == 4.0
