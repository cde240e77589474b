"""Real 2-process gloo DDP through train.py: global batch B split over two ranks reaches the same parameters
as one process with batch B, and as one process accumulating two micro-batches of B/2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reliability_harness import child_env

from gcvit.engine.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[1]
# Deterministic per-sample pipeline (no random crop/flip/mixup, no drop path): what differs between the runs
# is only how the global batch is split, which must not change the result beyond fp32 summation order.
COMMON = ["debug=tiny", "aug=none", "model.drop_path_rate=0.0", "trainer.max_steps=3",
          "trainer.ema_decay=null", "trainer.global_batch_size=16", "trainer.ckpt_every_steps=0",
          "trainer.eval_every_epochs=1000"]


def _run(run_dir: Path, *extra: str, nproc: int = 1) -> dict:
    args = [str(REPO / "train.py"), *COMMON, f"trainer.output_dir={run_dir}", *extra]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
           if nproc > 1 else [sys.executable, *args])
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=child_env())
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    mgr = CheckpointManager(run_dir / "checkpoints")
    return mgr.load(mgr.latest())


@pytest.mark.slow
def test_ddp_two_ranks_equals_one_process_with_and_without_accumulation(tmp_path: Path) -> None:
    single = _run(tmp_path / "single", "data.batch_size=16")  # 1 x 16, no accumulation
    accum = _run(tmp_path / "accum", "data.batch_size=8")  # 1 x 8 x 2 micro-batches
    ddp = _run(tmp_path / "ddp", "data.batch_size=8", nproc=2)  # 2 ranks x 8
    for name, ref in single["model"].items():
        for other in (accum, ddp):
            torch.testing.assert_close(other["model"][name], ref, rtol=1e-4, atol=1e-5, msg=name)
        # Both split the batch into the same two halves and average them (a/2 + b/2): equal to the bit.
        assert torch.equal(ddp["model"][name], accum["model"][name]), name
    # The optimizer really stepped three times with non-zero gradients (equal weights are not trivially so).
    moments = [s["exp_avg"] for s in single["optimizer"]["state"].values()]
    assert all(int(s["step"]) == 3 for s in single["optimizer"]["state"].values())
    assert sum(float(m.abs().sum()) for m in moments) > 0
