"""What a run reports on rank 0: metrics.jsonl, run_info.json and the tqdm bar (MFU: gcvit.engine.mfu)."""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gcvit.engine import distributed
from gcvit.engine.provenance import device_name, git_commit, package_versions
from gcvit.engine.runtime import synchronize
from gcvit.engine.secrets import redact


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
        synchronize(self.device)  # what the warm-up queued is charged to the warm-up
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
