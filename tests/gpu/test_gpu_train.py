"""GPU tier, trainer: train.py on one GPU in bf16 (the tiny preset on the demo JPEGs): finite falling loss,
checkpoints, a bitwise resume under trainer.deterministic=true, eval-only of the checkpoint, compiled by
blocks (cold, then warm after a requeue) and whole with CUDA graphs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reliability_harness import child_env

from gcvit.engine.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[2]
# The demo JPEGs through the torch loader (DALI is optional on the GPU kit's machine), 64 steps of 32 images.
GPU_RUN = ("debug=tiny", "trainer.device=cuda", "trainer.precision=bf16", "data.loader=torch",
           "data.workers=4", "data.batch_size=32", "trainer.global_batch_size=32", "optim.lr_batch_size=32",
           "model.img_size=64", "model.overrides.window_size=[4,4,4,2]", "trainer.max_steps=64",
           "sched.epochs=2", "trainer.ckpt_every_steps=16", "trainer.log_every_steps=4",
           "trainer.deterministic=true")


def _train(run_dir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, str(REPO / "train.py"), *GPU_RUN, f"trainer.output_dir={run_dir}",
                          *overrides], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                         env=child_env())
    assert res.returncode == 0, \
        f"train.py {' '.join(overrides)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


def _losses(run_dir: Path) -> dict[int, float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _final(run_dir: Path) -> dict:
    mgr = CheckpointManager(run_dir / "checkpoints")
    return mgr.load(mgr.latest())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("gpu-full")
    _train(run_dir)
    return run_dir


def test_bf16_run_has_finite_falling_loss_checkpoints_and_mfu(full_run) -> None:
    losses = _losses(full_run)
    assert max(losses) == 64 and all(map(torch.isfinite, map(torch.tensor, losses.values())))
    first, last = [losses[s] for s in sorted(losses)[:2]], [losses[s] for s in sorted(losses)[-2:]]
    assert sum(last) < 0.8 * sum(first), f"loss did not fall: {losses}"
    state = _final(full_run)
    assert state["progress"]["step"] == 64
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    records = [json.loads(r) for r in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" and r["count"] > 0 for r in records)
    assert "mfu" in next(r for r in records if r["kind"] == "train")  # logged on GPU (null for unknown GPUs)


def test_deterministic_resume_is_bitwise_on_gpu(full_run, tmp_path) -> None:
    """Stop after 24 steps (mid-epoch), start the same command again: per-step losses and the final model,
    EMA and optimizer equal the uninterrupted run's."""
    _train(tmp_path, "trainer.max_steps=24")
    res = _train(tmp_path)
    assert "resumed from" in res.stdout
    assert _losses(tmp_path) == _losses(full_run)
    a, b = _final(tmp_path), _final(full_run)
    for part in ("model", "ema"):
        diff = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not diff, f"{part} differs after resume: {diff[:5]}"
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(),
                                                   b["optimizer"]["state"][0].values()))


def test_eval_only_on_gpu_reads_the_checkpoint(full_run) -> None:
    res = _train(full_run, "mode=eval", f"checkpoint={CheckpointManager(full_run / 'checkpoints').latest()}")
    assert "eval model weights" in res.stdout and "eval ema weights" in res.stdout, res.stdout[-2000:]


def _compile_line(res: subprocess.CompletedProcess) -> str:
    """The one line a compiled start prints: how, the cache, cold or warm, the first step's time."""
    return next((ln for ln in res.stdout.splitlines() if ln.startswith("compile: ")), res.stdout[-2000:])


def test_compiled_by_blocks_cold_then_warm_after_a_requeue(tmp_path) -> None:
    """trainer.compile=blocks: the first start compiles cold into RUN_DIR/compile-cache and says so in one
    line; the same command again (a requeued job) resumes and takes every graph from there."""
    compiled = ("trainer.compile=blocks", "trainer.deterministic=false")
    line = _compile_line(_train(tmp_path, *compiled, "trainer.max_steps=8", timeout=500))
    assert line.startswith("compile: blocks") and ": cold," in line and "compile-cache" in line, line
    res = _train(tmp_path, *compiled, "trainer.max_steps=16")
    assert "resumed from" in res.stdout
    line = _compile_line(res)
    assert line.startswith("compile: blocks") and ": warm," in line, line
    losses = _losses(tmp_path)
    assert max(losses) == 16 and all(v == v for v in losses.values())


def test_compiled_whole_with_cuda_graphs(tmp_path) -> None:
    """trainer.compile=model with trainer.compile_mode=reduce-overhead (CUDA graphs; single process only) runs
    its steps without error and with a finite loss."""
    _train(tmp_path, "trainer.compile=model", "trainer.compile_mode=reduce-overhead",
           "trainer.deterministic=false", "trainer.max_steps=8", timeout=500)
    losses = _losses(tmp_path)
    assert max(losses) == 8 and all(v == v for v in losses.values())
