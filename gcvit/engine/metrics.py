"""What a run reports on rank 0: metrics.jsonl, run_info.json, the tqdm bar, model FLOPs utilisation."""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from gcvit.engine import distributed
from gcvit.engine.provenance import device_name, git_commit, package_versions
from gcvit.engine.secrets import redact

# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets, by a pattern of torch.cuda.get_device_name():
# (bf16 = fp16, fp32 as TF32 on tensor cores, which the trainer enables). The first match wins, so the PCIe
# and NVL cards come before the SXM parts that share their name ("NVIDIA H100 80GB HBM3"). A card that
# matches nothing gets no figure (mfu: null), never a guessed one.
_PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756.0, 378.0),
    (r"\bH100\b.*\bNVL\b", 835.0, 417.5),
    (r"\bH200\b.*\bNVL\b", 835.0, 417.5),
    (r"\bG?H200\b", 989.0, 494.5),  # H200 SXM, GH200
    (r"\bH100\b", 989.0, 494.5),  # H100 SXM
    (r"\bA100\b", 312.0, 156.0),  # every A100 form factor
    (r"\bL40S\b", 362.0, 183.0),
    (r"\bA10\b", 125.0, 62.5),  # not the A10G, a different chip
)


def peak_tflops(name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of the GPU named `name` at `precision` (fp32 as TF32); None if not in the table."""
    for pattern, half, tf32 in _PEAK_TFLOPS:
        if re.search(pattern, name):
            return tf32 if precision == "fp32" else half
    return None


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one accelerator at `precision`, None on CPU, an unknown card or fp32 without TF32."""
    if device.type != "cuda":
        return None
    if precision == "fp32" and not torch.backends.cuda.matmul.allow_tf32:
        return None  # trainer.deterministic turns TF32 off: plain fp32 peaks are not in the table
    tflops = peak_tflops(torch.cuda.get_device_name(device), precision)
    return None if tflops is None else tflops * 1e12


def train_flops_per_image(model: nn.Module, img_size: int, device: torch.device) -> float:
    """Forward FLOPs of one image counted by torch's FlopCounterMode, x3 for forward plus backward."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, img_size, img_size, device=device)
    was_training = model.training
    model.eval()
    # with gradients on, as in a train step: the CPU attention then runs the GEMMs the counter knows (its
    # no-grad form is SDPA's fused CPU kernel, which the counter does not count)
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return 3.0 * counter.get_total_flops()


def run_info(world_size: int, device: torch.device, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What produced this run: code version, packages, hosts and devices (secrets redacted)."""
    cuda = device.type == "cuda"
    devices = ([device_name(torch.device("cuda", i)) for i in range(torch.cuda.device_count())] if cuda
               else [device_name(device)])
    return redact({"git_commit": git_commit(), "python": sys.version.split()[0],
                   "packages": package_versions(), "world_size": world_size, "device": str(device),
                   "devices_on_rank0_host": devices,
                   "host": socket.gethostname(), "cpu_threads": torch.get_num_threads(),
                   "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "argv": sys.argv, **(extra or {})})


class MetricsWriter:
    """Appends JSON records to RUN_DIR/metrics.jsonl (rank 0; a no-op elsewhere)."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop records newer than `step`: a resumed run recomputes them and must not log them twice."""
        if not self.enabled or not self.path.exists():
            return
        kept = [ln for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, self.path)

    def write(self, record: Mapping[str, Any]) -> None:
        """One line per record, flushed at once so a killed run keeps everything logged so far."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(dict(record), sort_keys=False) + "\n")


class Window:
    """Sums over the steps between two train records; record() turns them into one (a collective)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Start a new window now."""
        self.loss = torch.zeros((), device=self.device)
        self.steps = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        """Leave the steps so far out of img/s and data wait (compile warm-up); their loss still counts."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # what the warm-up queued is charged to the warm-up
        self.timed, self.wait, self.t0 = 0, 0.0, time.perf_counter()

    def add(self, loss: torch.Tensor, wait: float) -> None:
        """Account one optimizer step (its loss stays on the device: no sync per step)."""
        self.loss += loss.detach().float()
        self.steps += 1
        self.timed += 1
        self.wait += wait

    def record(self, *, step: int, epoch: int, lr: float, grad_norm: float, global_batch: int,
               world_size: int, flops_per_image: float | None, peak: float | None) -> dict[str, Any]:
        """The train record of this window (loss averaged over ranks and steps), then a fresh window."""
        dt = time.perf_counter() - self.t0
        loss = distributed.all_reduce_sum(self.loss.clone()).item() / (world_size * self.steps)
        rate = self.timed * global_batch / dt if self.timed else None  # null: only warm-up steps so far
        rec = {"kind": "train", "step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "img_per_s": rate, "data_wait": self.wait / dt}
        # null where the peak is unknown (CPU, a card not in the table): no figure rather than a wrong one
        known = rate and flops_per_image and peak
        rec["mfu"] = rate * flops_per_image / (peak * world_size) if known else None
        self.reset()
        return rec


class Progress:
    """tqdm bar on rank 0 showing loss, lr, img/s and the share of time spent waiting for data."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step",
                        file=sys.stdout, mininterval=1.0)

    def show(self, rec: Mapping[str, Any]) -> None:
        """Move to the record's step and show its loss, lr, img/s, data-wait share (and MFU on GPU), and with
        several ranks the slowest one (gcvit.engine.step_accounting)."""
        keys = {"loss": "loss", "lr": "lr", "img_per_s": "img/s", "data_wait": "wait", "mfu": "mfu"}
        postfix = {name: f"{rec[k]:.3g}" for k, name in keys.items() if rec.get(k) is not None}
        if "slowest_rank" in rec:
            postfix["slowest"] = (f"r{rec['slowest_rank']}@{rec['slowest_host']} {rec['slowest_cause']} "
                                  f"{rec['slowest_ratio']:.2f}x")
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(rec["step"] - self.bar.n)

    def write(self, msg: str) -> None:
        """Print a line without breaking the bar."""
        self.bar.write(msg, file=sys.stdout)

    def close(self) -> None:
        """Finish the bar."""
        self.bar.close()
