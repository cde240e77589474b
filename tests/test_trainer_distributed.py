"""Launcher environments (torchrun, srun, none), the stop flag on real signals, and single-process helpers."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from gcvit.engine import distributed
from gcvit.engine.preemption import StopFlag


def test_single_process_without_any_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    env = distributed.init("cpu")
    assert (env.rank, env.world_size, env.is_main, env.distributed) == (0, 1, True, False)
    assert env.device == torch.device("cpu")
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.gather_object(3) == [3]
    assert torch.equal(distributed.all_reduce_sum(torch.ones(2)), torch.ones(2))


def _setenv(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_torchrun_env_wins_over_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    _setenv(monkeypatch, RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", SLURM_NTASKS="2", SLURM_PROCID="0")
    assert distributed._launcher_env() == (3, 8, 1)


def test_srun_tasks_derive_rank_and_rendezvous(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    # PATH without scontrol: the nodelist parser takes over
    _setenv(monkeypatch, PATH="/nonexistent", SLURM_NTASKS="16", SLURM_PROCID="9", SLURM_LOCALID="1",
            SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[017-018,020],login1")
    assert distributed._launcher_env() == (9, 16, 1)
    assert os.environ["MASTER_ADDR"] == "gpu017" and os.environ["MASTER_PORT"] == str(15000 + 4242)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_signal_only_sets_the_flag(sig: signal.Signals) -> None:
    flag = StopFlag().install()
    try:
        assert flag.tensor(torch.device("cpu")).item() == 0.0
        os.kill(os.getpid(), sig)  # the process survives: the handler only records the request
        assert flag.requested and flag.signum == sig and flag.tensor(torch.device("cpu")).item() == 1.0
    finally:
        flag.uninstall()
    assert signal.getsignal(sig) is not flag._handler


def test_device_cuda_without_gpu_is_one_line() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit, match="trainer.device=cuda but no CUDA device"):
        distributed.resolve_device("cuda")
    assert distributed.resolve_device("auto") == torch.device("cpu")
