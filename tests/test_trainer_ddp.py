"""Real 2-process gloo DDP through train.py: global batch B split over two ranks reaches the same parameters
as one process with batch B, and as one process accumulating two micro-batches of B/2; the DDP wrapper's
settings; a stop signal on one rank stops both at the same step."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from reliability_harness import child_env, start, state

import gcvit
from gcvit.engine import distributed
from gcvit.engine.checkpoint import CheckpointManager
from gcvit.engine.distributed import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
# Deterministic per-sample pipeline (no random crop/flip/mixup, no drop path): what differs between the runs
# is only how the global batch is split, which must not change the result beyond fp32 summation order.
COMMON = ["debug=tiny", "aug=none", "model.drop_path_rate=0.0", "trainer.max_steps=3",
          "trainer.ema_decay=null", "trainer.global_batch_size=16", "trainer.ckpt_every_steps=1",
          "trainer.log_every_steps=1", "trainer.eval_every_epochs=1000"]


def _run(run_dir: Path, *extra: str, nproc: int = 1) -> tuple[dict, dict, float]:
    """The checkpoints after step 1 and step 3, and the loss of step 1."""
    args = [str(REPO / "train.py"), *COMMON, f"trainer.output_dir={run_dir}", *extra]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
           if nproc > 1 else [sys.executable, *args])
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=child_env())
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "Grad strides do not match bucket view strides" not in res.stderr  # see _channels_last_kernels
    mgr = CheckpointManager(run_dir / "checkpoints")
    first = next(r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                 if r["kind"] == "train" and r["step"] == 1)
    return mgr.load(mgr.path("step000000001")), mgr.load(mgr.path("step000000003")), first["loss"]


@pytest.mark.slow
def test_ddp_two_ranks_equals_one_process_with_and_without_accumulation(tmp_path: Path) -> None:
    """What DDP guarantees, for every split of the global batch: the first step's loss and gradients (AdamW's
    first moment after one step is 0.1 x the gradient) up to fp32 summation order, and for the same two
    halves (2 ranks, or 1 rank accumulating 2 micro-batches) the same weights to the bit after 3 steps.

    Weights of differently summed runs are not compared: AdamW divides by sqrt(v), which turns summation
    noise on gradients that are zero in exact arithmetic (the key bias, to which softmax is blind) into
    steps of full size: such weights may differ by up to ~lr (they did with the fused AdamW)."""
    runs = {
        "1 x 16": _run(tmp_path / "single", "data.batch_size=16"),
        "1 x 8 x 2 accumulated": _run(tmp_path / "accum", "data.batch_size=8"),
        "2 ranks x 8": _run(tmp_path / "ddp", "data.batch_size=8", nproc=2),
        "2 ranks x 4 x 2 accumulated": _run(tmp_path / "ddp-accum", "data.batch_size=4", nproc=2),
    }
    (ref, _, ref_loss), *_ = runs.values()
    for split, (first, _, loss) in runs.items():
        assert loss == pytest.approx(ref_loss, rel=1e-5), split
        for i, s in ref["optimizer"]["state"].items():
            torch.testing.assert_close(first["optimizer"]["state"][i]["exp_avg"], s["exp_avg"], rtol=1e-4,
                                       atol=1e-7, msg=f"{split}: gradient of parameter {i}")
    accum, ddp = runs["1 x 8 x 2 accumulated"][1], runs["2 ranks x 8"][1]
    for name, w in accum["model"].items():
        # Both split the batch into the same two halves and average them (a/2 + b/2): equal to the bit.
        assert torch.equal(ddp["model"][name], w), name
    # The optimizer really stepped three times with non-zero gradients (equal weights are not trivially so).
    assert all(int(s["step"]) == 3 for s in ddp["optimizer"]["state"].values())
    assert sum(float(s["exp_avg"].abs().sum()) for s in ddp["optimizer"]["state"].values()) > 0


def test_ddp_wrapper_settings_and_what_justifies_them(tmp_path: Path) -> None:
    """Bucket-view gradients always; static graph only without no_sync accumulation or unused parameters; no
    per-forward buffer broadcast, since no variant has a buffer worth broadcasting (only constants set at
    build time, outside the state_dict: the rel-pos indices and the drop path keep probabilities)."""
    for name in gcvit.list_models():
        with torch.device("meta"):
            model = gcvit.create_model(name)
        buffers = dict(model.named_buffers())
        assert all(n.endswith((".rel_index", ".keep_prob")) for n in buffers)
        assert not buffers.keys() & model.state_dict().keys()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        cpu = torch.device("cpu")
        model = gcvit.create_model("gcvit_xxtiny", num_classes=4, img_size=32, window_size=[4, 4, 2, 1],
                                   dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2])
        net = distributed.wrap_ddp(model, cpu, [], accum=1)
        assert net.gradient_as_bucket_view and net.static_graph and not net.broadcast_buffers
        assert not distributed.wrap_ddp(model, cpu, [], accum=2).static_graph
        assert not distributed.wrap_ddp(model, cpu, ["head.weight"], accum=1).static_graph
        for _ in range(2):  # after the first step DDP points every gradient into its buckets
            net(torch.randn(2, 3, 32, 32)).sum().backward()
        storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
        assert len(storages) <= 2, f"{len(storages)} gradient storages: not views of DDP's (1-2) buckets"
        # drop path runs each branch on a varying subset of the batch, the whole of it dropped too (rates up
        # to 0.99 on 2 samples): the static graph holds, since every parameter still gets its gradient
        torch.manual_seed(0)
        model = gcvit.create_model("gcvit_xxtiny", num_classes=4, img_size=32, window_size=[4, 4, 2, 1],
                                   dim=16, depths=[2, 2, 2, 2], num_heads=[1, 1, 2, 2], drop_path_rate=0.99)
        net = distributed.wrap_ddp(model, cpu, [], accum=1)
        for _ in range(4):
            net(torch.randn(2, 3, 32, 32)).sum().backward()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_both_at_the_same_step(tmp_path: Path) -> None:
    """SIGUSR1 to rank 1 alone, away from log and checkpoint steps: the request travels in the step packet
    (read one step late), both ranks save the same step once and exit 75."""
    run = start(tmp_path / "run", "debug=tiny", "sched.epochs=50", "trainer.max_steps=1000",
                "trainer.log_every_steps=1000", "trainer.ckpt_every_steps=0", "trainer.audit=true", nproc=2)
    first_batch = run.run_dir / "audit" / "train-rank1.jsonl"  # rank 1 is in the loop: its handler is on
    deadline = time.monotonic() + 240
    while not first_batch.exists():
        assert all(p.poll() is None for p in run.procs) and time.monotonic() < deadline, run.err(1)[-3000:]
        time.sleep(0.05)
    run.procs[1].send_signal(signal.SIGUSR1)
    run.wait(300)
    codes = [p.returncode for p in run.procs]
    assert codes == [PREEMPTED_EXIT_CODE] * 2, f"{codes}\n{run.err(0)[-3000:]}\n{run.err(1)[-3000:]}"
    assert sorted(p.name for p in (run.run_dir / "checkpoints").iterdir()) == ["last.pt"]
    saved = state(run.run_dir)
    step = saved["progress"]["step"]
    assert f"a stop signal on another rank: saved step {step} in" in run.out(0)
    assert saved["guard"]["steps"] == step
