"""Launcher scripts: the local SLURM cluster itself and the scripts' one-line refusals."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

TORCHRUN = REPO_ROOT / "launch" / "torchrun.sh"


@pytest.mark.slurm
def test_local_cluster_runs_a_two_task_step(slurm_cluster: str) -> None:
    """srun on the local cluster starts two tasks with distinct SLURM_PROCIDs."""
    out = subprocess.run(["srun", "--ntasks=2", "bash", "-c", "echo $SLURM_PROCID"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert sorted(out.split()) == ["0", "1"]


@pytest.mark.parametrize(("args", "needle"), [
    (["--nnodes", "2", "trainer.max_steps=1"], "needs --rdzv-endpoint HOST:PORT"),
    (["--nodes", "2"], "unknown option --nodes"),
])
def test_torchrun_refuses_bad_options_in_one_line(args: list[str], needle: str) -> None:
    """Wrong launcher options stop before torchrun starts, with one line naming the option."""
    res = subprocess.run([str(TORCHRUN), *args], capture_output=True, text=True, timeout=60,
                         env={"PATH": f"{REPO_ROOT / '.venv' / 'bin'}:/usr/bin:/bin",
                              "GCVIT_PYTHON": sys.executable, "NPROC_PER_NODE": "1"})
    assert res.returncode == 2
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1
