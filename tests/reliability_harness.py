"""Running the real train.py for reliability tests: one or more ranks, SIGKILLed on cue."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gcvit.engine.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[1]
# Variables of the caller's shell that change what a launched train.py or launcher prints or does: Hydra's
# full tracebacks (HYDRA_FULL_ERROR), our test knobs, W&B settings, and the rank/rendezvous variables of a
# surrounding torchrun or SLURM allocation (a test run inside `srun` must not join that job).
_CALLER_ONLY = ("HYDRA_", "GCVIT_TEST_", "WANDB_", "SLURM_", "SBATCH_", "SALLOC_", "TORCHELASTIC_")
_CALLER_ONLY_NAMES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                      "MASTER_ADDR", "MASTER_PORT"}


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a launched train.py/launcher: the caller's, pinned where the tests depend on it."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_CALLER_ONLY) and k not in _CALLER_ONLY_NAMES}
    return {**env, "OMP_NUM_THREADS": "1", **extra}
# The real input pipeline for every launch: DALI decoding and augmenting on the CPU.
LOADER = ("data.loader=dali", "data.dali_device=cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    """One launch of train.py (one process per rank, all in one process group), with its output files."""

    run_dir: Path
    procs: list[subprocess.Popen]
    logs: Path

    def out(self, rank: int = 0) -> str:
        """Everything rank `rank` printed to stdout."""
        return (self.logs / f"rank{rank}.out").read_text(errors="replace")

    def err(self, rank: int = 0) -> str:
        """Everything rank `rank` printed to stderr."""
        return (self.logs / f"rank{rank}.err").read_text(errors="replace")

    def wait(self, timeout: float = 300) -> int:
        """Exit code of rank 0 once every rank has exited (all are killed on timeout)."""
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            self.kill()
        return self.procs[0].returncode

    def wait_for(self, marker: str, count: int | None = None, timeout: float = 240) -> None:
        """Block until `marker` was printed to stderr by `count` ranks (all by default)."""
        count = len(self.procs) if count is None else count
        deadline = time.monotonic() + timeout
        while sum(marker in self.err(r) for r in range(len(self.procs))) < count:
            if any(p.poll() is not None for p in self.procs):
                raise AssertionError(f"train.py exited before {marker!r}:\n{self.err()[-4000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no {marker!r} within {timeout}s:\n{self.err()[-4000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL every rank at once (not a clean exit: nothing runs after it)."""
        if any(p.poll() is None for p in self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.procs[0].pid, signal.SIGKILL)
        for p in self.procs:
            p.wait(timeout=60)

    def check(self, timeout: float = 300) -> Run:
        """Wait and assert exit code 0 on every rank."""
        self.wait(timeout)
        for r, p in enumerate(self.procs):
            assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{self.err(r)[-4000:]}"
        return self


def start(run_dir: Path, *overrides: str, nproc: int = 1, env: dict[str, str] | None = None,
          logs: Path | None = None) -> Run:
    """Launch `python train.py overrides... trainer.output_dir=run_dir` as `nproc` ranks (torchrun env)."""
    logs = logs or run_dir.parent / f"{run_dir.name}-logs-{time.monotonic_ns()}"
    logs.mkdir(parents=True)
    base = child_env(**(env or {}))
    if nproc > 1:
        base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(nproc))
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, f"trainer.output_dir={run_dir}", *LOADER]
    procs: list[subprocess.Popen] = []
    for rank in range(nproc):
        rank_env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)} if nproc > 1 else base
        with open(logs / f"rank{rank}.out", "w") as out, open(logs / f"rank{rank}.err", "w") as err:
            # One process group for all ranks: kill() hits every rank with one killpg.
            group = {"process_group": procs[0].pid if procs else 0}
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=rank_env, stdout=out, stderr=err, **group))
    return Run(run_dir, procs, logs)


def train(run_dir: Path, *overrides: str, nproc: int = 1, env: dict[str, str] | None = None,
          timeout: float = 300) -> Run:
    """Launch and wait for a successful finish."""
    return start(run_dir, *overrides, nproc=nproc, env=env).check(timeout)


def state(run_dir: Path, tag: str | None = None) -> dict[str, Any]:
    """The checkpoint `tag` of a run (default: the newest loadable one)."""
    mgr = CheckpointManager(run_dir / "checkpoints")
    path = mgr.path(tag) if tag else mgr.latest()
    assert path is not None and path.is_file(), f"no checkpoint {tag or ''} in {run_dir}"
    return mgr.load(path)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> logged train loss from metrics.jsonl (each step once: a resume truncates what it redoes)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert len(steps) == len(set(steps)), f"steps logged twice in {run_dir}: {steps}"
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def assert_states_equal(a: Any, b: Any, path: str = "") -> None:
    """Bitwise equality of two nested checkpoint structures (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_states_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{path}.{i}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run dir (checkpoints, metrics) to continue differently from the same point."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def steps_per_epoch(run_dir: Path) -> int:
    """Optimizer steps per epoch of a run, from its run_info.json."""
    return int(json.loads((run_dir / "run_info.json").read_text())["steps_per_epoch"])


def make_dataset(root: Path, classes: int = 4, train_per_class: int = 14, val_per_class: int = 3,
                 size: int = 40) -> Path:
    """A small ImageFolder of real JPEG files (class = dominant colour plus noise), written by this test."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.zeros((size, size + 8, 3), np.float32)
                base[..., c % 3] = 60 + 60 * (c // 3)
                img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{split}_{c}_{i}.JPEG", quality=90)
    return root


def _audit_entries(run_dir: Path) -> dict[Path, list[dict[str, Any]]]:
    return {p: [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
            for p in sorted((run_dir / "audit").glob("train-rank*.jsonl"))}


def audit_ids(run_dir: Path) -> dict[int, list[int]]:
    """epoch -> every train sample id in RUN_DIR/audit (all ranks and launches; duplicates kept)."""
    out: dict[int, list[int]] = {}
    for entries in _audit_entries(run_dir).values():
        for e in entries:
            out.setdefault(e["epoch"], []).extend(e["ids"])
    assert out, f"no audit records in {run_dir / 'audit'}"
    return out


def run_all(launches: dict[str, tuple[Path, tuple[str, ...], dict[str, str]]], logs: Path, parallel: int = 3,
            timeout: float = 600) -> dict[str, Run]:
    """Launch independent single-process runs, `parallel` at a time (output under `logs`); all finished."""
    pending, running, done = list(launches.items()), {}, {}
    deadline = time.monotonic() + timeout
    while pending or running:
        while pending and len(running) < parallel:
            name, (run_dir, overrides, env) = pending.pop(0)
            running[name] = start(run_dir, *overrides, env=env, logs=logs / name.replace(" ", "-"))
        for name, run in list(running.items()):
            if run.procs[0].poll() is not None:
                done[name] = running.pop(name)
        if time.monotonic() > deadline:
            for run in running.values():
                run.kill()
            raise AssertionError(f"still running after {timeout}s: {sorted(running)}")
        time.sleep(0.1)
    return done
