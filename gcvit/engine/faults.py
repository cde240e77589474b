"""Fault injection for tests: NaN losses, a fake CUDA OOM, pauses in a step or a save, a slow rank.

The one place tests reach into a run. Each knob is an environment variable (docs/development.md, "Test-only
knobs"); step_faults() and save_faults() return None unless one is set. The loop asks once per run and
hands the answer to train_step and CheckpointManager, which with None take their production path untouched.
A pause prints a marker line to stderr first, so that a test waiting for it can SIGKILL the process at that
exact point.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

# Comma-separated 1-based optimizer steps whose loss becomes NaN (on every micro-batch of the step).
NAN_ENV = "GCVIT_TEST_NAN_AT_STEPS"
# The 1-based step whose first micro-batch raises torch.OutOfMemoryError as CUDA would (the one-line OOM
# report is tested without a GPU).
OOM_ENV = "GCVIT_TEST_OOM_AT_STEP"
# "STEP:MICRO" (1-based step, 0-based micro-batch): every rank stops there for 10 minutes, printing
# STEP_PAUSE_MARKER, so a test can SIGKILL the run in the middle of gradient accumulation.
STEP_PAUSE_ENV = "GCVIT_TEST_PAUSE_AT_MICRO"
STEP_PAUSE_MARKER = "GCVIT_TEST_PAUSED_IN_STEP"
# "SECONDS" pauses inside every checkpoint save, "SECONDS@N" inside the N-th save of this process; the pause
# comes after the first bytes reach the temporary file, so a SIGKILL then interrupts a real write.
SAVE_PAUSE_ENV = "GCVIT_TEST_PAUSE_IN_SAVE"
SAVE_PAUSE_MARKER = "GCVIT_TEST_PAUSED_IN_SAVE"
STEP_PAUSE_SECONDS = 600
# "RANK:SECONDS": that rank waits this long before each batch (a data straggler) or after each forward (a
# compute straggler); the step accounting must name it and the right cause.
SLOW_LOADER_ENV = "GCVIT_TEST_SLOW_LOADER"
SLOW_FORWARD_ENV = "GCVIT_TEST_SLOW_FORWARD"


class StepFaults:
    """What the step knobs ask for; applied to each micro-batch's loss before backward."""

    def __init__(self, nan_at: set[int], oom_at: int | None, pause_at: tuple[int, int] | None,
                 slow_loader: float = 0.0, slow_forward: float = 0.0) -> None:
        self.nan_at, self.oom_at, self.pause_at = nan_at, oom_at, pause_at
        self.slow_loader, self.slow_forward = slow_loader, slow_forward

    def batches(self, batches: Iterator[Any]) -> Iterator[Any]:
        """`batches`, each one late by the slow-loader delay of this rank (inside the consumer's next())."""
        for batch in batches:
            time.sleep(self.slow_loader)
            yield batch

    def on_loss(self, loss: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        """The loss of micro-batch `micro` of optimizer step `step`, after pausing or raising when asked."""
        if self.pause_at == (step, micro):
            rank = os.environ.get("RANK", "0")
            print(f"{STEP_PAUSE_MARKER} {step}:{micro} rank {rank}", file=sys.stderr, flush=True)
            time.sleep(STEP_PAUSE_SECONDS)
        if (step, micro) == (self.oom_at, 0):
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({OOM_ENV}).")
        if step in self.nan_at:
            return loss * float("nan")
        time.sleep(self.slow_forward)
        return loss


def step_faults() -> StepFaults | None:
    """The step faults the environment asks for, or None (every real run)."""
    nan = os.environ.get(NAN_ENV, "")
    oom = os.environ.get(OOM_ENV)
    pause = os.environ.get(STEP_PAUSE_ENV)
    slow = {name: _this_rank(os.environ.get(name)) for name in (SLOW_LOADER_ENV, SLOW_FORWARD_ENV)}
    if not (nan.strip() or oom or pause or any(slow.values())):
        return None
    return StepFaults(nan_at={int(s) for s in nan.split(",") if s.strip()},
                      oom_at=int(oom) if oom else None,
                      pause_at=tuple(int(v) for v in pause.split(":")) if pause else None,
                      slow_loader=slow[SLOW_LOADER_ENV], slow_forward=slow[SLOW_FORWARD_ENV])


def _this_rank(spec: str | None) -> float:
    """The seconds of a "RANK:SECONDS" knob on this rank (RANK of torchrun, SLURM_PROCID of srun), else 0."""
    if not spec:
        return 0.0
    rank, seconds = spec.split(":")
    mine = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    return float(seconds) if rank == mine else 0.0


class SaveFaults:
    """A pause inside checkpoint writes: every one, or only the `nth` save of this process."""

    def __init__(self, seconds: float, nth: int | None) -> None:
        self.seconds, self.nth = seconds, nth

    def writer(self, f: IO[bytes], save_no: int, path: Path) -> IO[bytes] | _PausingWriter:
        """`f`, or a writer that pauses after its first write when this is the save to interrupt."""
        if self.nth is not None and self.nth != save_no:
            return f
        return _PausingWriter(f, self.seconds, path)


def save_faults() -> SaveFaults | None:
    """The checkpoint-write pause the environment asks for, or None (every real run)."""
    spec = os.environ.get(SAVE_PAUSE_ENV)
    if not spec:
        return None
    seconds, _, nth = spec.partition("@")
    return SaveFaults(float(seconds), int(nth) if nth else None)


class _PausingWriter:
    """File wrapper for the crash tests: the checkpoint's first bytes are on disk when it pauses."""

    def __init__(self, f: IO[bytes], seconds: float, path: Path) -> None:
        self._f, self._seconds, self._path, self._paused = f, seconds, path, False

    def write(self, data: Any) -> int:
        """Write, then (once) flush and pause so that a killer finds a half-written temporary file."""
        n = self._f.write(data)
        if not self._paused:
            self._paused = True
            self._f.flush()
            print(f"{SAVE_PAUSE_MARKER} {self._path}", file=sys.stderr, flush=True)
            time.sleep(self._seconds)
        return n

    def flush(self) -> None:
        """Flush the wrapped file."""
        self._f.flush()
