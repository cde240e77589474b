"""Shared pytest fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_ROOT = REPO_ROOT.parent / "shared" / "imagenet-sample"


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    """The 1000 real ImageNet JPEGs beside the checkout; skipped on a fresh clone that lacks them."""
    if not (SAMPLE_ROOT / "classes.tsv").is_file():
        pytest.skip(f"{SAMPLE_ROOT} is absent (only our build machines have it); "
                    "the same guarantees are covered by tests on generated images")
    return SAMPLE_ROOT


LOCAL_SLURM = REPO_ROOT / "launch" / "local_slurm.sh"
# One file per pytest process using the local cluster: the last one out stops it, if a fixture started it.
SLURM_USERS = Path("/var/tmp/gcvit-local-slurm.users")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node SLURM cluster (launch/local_slurm.sh), started as root when needed, stopped after."""
    import os
    import shutil
    import subprocess

    def local(cmd: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([str(LOCAL_SLURM), cmd], capture_output=True, text=True, timeout=timeout)

    def alive(pid: str) -> bool:
        return pid.isdigit() and Path(f"/proc/{pid}").exists()

    if local("status", 30).returncode != 0:
        if Path("/etc/slurm/slurm.conf").is_file() and "launch/local_slurm.sh" not in \
                Path("/etc/slurm/slurm.conf").read_text():
            pytest.skip("/etc/slurm/slurm.conf configures a real cluster; the launch tests run only on a "
                        "local one-node cluster (launch/local_slurm.sh) to keep test jobs off shared queues")
        if os.geteuid() != 0:
            pytest.skip("no local SLURM cluster answers and starting one needs root: "
                        "run `sudo launch/local_slurm.sh up` first")
        if not shutil.which("sbatch") and not shutil.which("apt-get"):
            pytest.skip("SLURM is not installed and apt-get is unavailable to install it")
        up = local("up", 400)
        if up.returncode != 0:
            pytest.fail(f"launch/local_slurm.sh up failed: {up.stderr.strip()[-2000:]}")
        SLURM_USERS.mkdir(parents=True, exist_ok=True)
        (SLURM_USERS / "started-by-fixture").touch()
    SLURM_USERS.mkdir(parents=True, exist_ok=True)
    me = SLURM_USERS / str(os.getpid())
    me.touch()
    try:
        yield "local"
    finally:
        me.unlink(missing_ok=True)
        others = [p for p in SLURM_USERS.iterdir() if alive(p.name)]
        started = SLURM_USERS / "started-by-fixture"
        if started.exists() and not others:  # a cluster started by hand stays up
            local("down", 120)
            started.unlink(missing_ok=True)
