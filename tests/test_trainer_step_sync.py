"""A steady-state training step never reads a tensor on the host: the non-finite verdict and the stop request
travel in one all-reduce, the fused AdamW applies the verdict itself, and the loop reads the packet one step
late. In process on CPU: the tiny model on synthetic data with the recipe's Mixup/CutMix, random erasing,
EMA and gradient accumulation, every host read of a tensor recorded (tests/gpu/test_gpu_step_sync.py checks
the same steps for CUDA syncs)."""
from __future__ import annotations

import contextlib
import os
import signal
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir

from gcvit import list_models
from gcvit.config import Config, from_hydra, register
from gcvit.engine import distributed, faults
from gcvit.engine.build import Parts, build
from gcvit.engine.faults import NAN_ENV as INJECT_ENV
from gcvit.engine.loop import train_step
from gcvit.engine.preemption import StopFlag
from gcvit.engine.rng import seed_step
from gcvit_data.resolve import resolve_data

CONF = Path(__file__).resolve().parents[1] / "conf"
# What turns a tensor into a Python value: on a GPU each one waits for the device.
READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
register()


def step_parts(device: str, *overrides: str) -> tuple[Config, distributed.DistEnv, Parts]:
    """The trainer's parts for the tiny model on synthetic data, 2 micro-batches of 8 per step, with the
    recipe's augmentations (shared with the GPU tier)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = from_hydra(compose(config_name="config", overrides=[
            "debug=tiny", "data=synthetic", "data.batch_size=8", "aug=in1k", f"trainer.device={device}",
            *overrides]), list_models)
    env = distributed.init(device)
    data = resolve_data(cfg.data, is_main=env.is_main, local_rank=env.local_rank,
                        broadcast=distributed.broadcast_object)
    return cfg, env, build(cfg, env, data)


@contextlib.contextmanager
def host_reads() -> Iterator[list[str]]:
    """Records every tensor -> Python value conversion made from Python code, with where it happened."""
    reads: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def spy(name: str) -> Any:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            where = traceback.extract_stack(limit=3)[0]
            reads.append(f"Tensor.{name} at {where.filename}:{where.lineno}")
            return saved[name](self, *args, **kwargs)
        return read

    for name in READS:
        setattr(torch.Tensor, name, spy(name))
    try:
        yield reads
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def _weights(p: Parts) -> list[torch.Tensor]:
    return [t.detach().clone() for t in p.model.state_dict().values()]


def test_spy_sees_reads() -> None:
    """The recorder itself works (the assertions below rely on it seeing every kind of read)."""
    t = torch.ones(())
    with host_reads() as reads:
        t.item(), bool(t), float(t), t.tolist()
    assert [r.split()[0] for r in reads] == ["Tensor.item", "Tensor.__bool__", "Tensor.__float__",
                                             "Tensor.tolist"]


def test_steady_steps_never_read_and_a_bad_step_is_skipped_then_reported_one_step_late(
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    monkeypatch.setenv(INJECT_ENV, "3")  # step 3's loss becomes NaN
    cfg, env, p = step_parts("cpu", "trainer.nonfinite_policy=stop", "trainer.nonfinite_max_consecutive=2")
    batches, stop, injected = iter(p.train_loader), StopFlag(), faults.step_faults()
    weights = [_weights(p)]
    capfd.readouterr()
    for step in range(1, 6):
        seed_step(cfg.trainer.seed, env.rank, step - 1)
        with host_reads() as reads:
            train_step(p, batches, env, cfg, stop.tensor(env.device), injected)
        assert reads == [], f"step {step} read tensors on the host:\n" + "\n".join(reads)
        weights.append(_weights(p))
        assert not p.guard.settle(keep_last=True)  # what the loop does between log and checkpoint steps
        assert p.guard.steps == step - 1, "the host reads the previous step's verdict, not this one's"
        err = capfd.readouterr().err
        assert ("non-finite guard: skipped step 3: loss=nan" in err) == (step == 4), (step, err)
    same = [all(torch.equal(a, b) for a, b in zip(weights[i], weights[i + 1])) for i in range(5)]
    # Step 3 was skipped by the optimizer before the host knew about it; the others updated the weights.
    assert same == [False, False, True, False, False]
    assert all(torch.isfinite(t).all() for t in weights[-1])
    p.guard.settle()  # a log or checkpoint step reads the newest verdict too
    assert p.guard.state_dict() == {"steps": 5, "skipped": 1, "consecutive": 0}


def test_a_stop_signal_travels_in_the_step_packet_and_is_read_one_step_later() -> None:
    cfg, env, p = step_parts("cpu")
    batches, stop = iter(p.train_loader), StopFlag().install()
    try:
        answers = []
        for step in range(1, 4):
            if step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)  # the handler only sets the flag
            seed_step(cfg.trainer.seed, env.rank, step - 1)
            train_step(p, batches, env, cfg, stop.tensor(env.device))
            answers.append(p.guard.settle(keep_last=True))
    finally:
        stop.uninstall()
    # Step 2's packet carries the request; it is read after step 3 (the loop then saves and exits 75).
    assert answers == [False, False, True]
