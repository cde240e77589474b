"""Real launches of the tiny preset on CPU (gloo): launch/slurm.sbatch and the submitit sweep launcher on a
one-node SLURM cluster, and launch/torchrun.sh restarting a group after a SIGKILLed worker."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from reliability_harness import assert_states_equal, child_env, losses, state, steps_per_epoch

from gcvit.engine.distributed import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm.sbatch"
TORCHRUN = REPO / "launch" / "torchrun.sh"
# The tiny preset for a part of its first epoch, deterministic so that runs can be compared bit for bit.
TARGET = 10
# feeder processes on, as in real runs: a signal to the job reaches them too
TINY = ("debug=tiny", "trainer.deterministic=true", f"trainer.max_steps={TARGET}", "data.feeder_workers=2")

pytestmark = pytest.mark.slow


def job_env(**extra: str) -> dict[str, str]:
    """The environment sbatch exports to the job: this venv's python, this checkout, one thread."""
    path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))  # also without `pip -e`
    return child_env(GCVIT_PYTHON=sys.executable, GCVIT_REPO=str(REPO), PYTHONPATH=path, **extra)


def sbatch(out_dir: Path, *args: str, wait: bool = False, **env: str) -> subprocess.CompletedProcess:
    """Submit launch/slurm.sbatch as 2 tasks of 1 CPU with its log in `out_dir`, from `out_dir`."""
    cmd = ["sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", f"--output={out_dir}/slurm-%j.out",
           "--time=10", *(["--wait"] if wait else []), str(SBATCH), *args]
    return subprocess.run(cmd, cwd=out_dir, env=job_env(**env), capture_output=True, text=True, timeout=300)


def job_field(job: str, name: str) -> str:
    """One field of `scontrol show job` (the controller keeps finished jobs for MinJobAge=300 s)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True,
                         timeout=30).stdout
    m = re.search(rf"\b{name}=(\S+)", out)
    return m.group(1) if m else ""


def wait_state(job: str, states: set[str], timeout: float = 180) -> str:
    """Poll until the job reaches one of `states`."""
    deadline = time.monotonic() + timeout
    while (st := job_field(job, "JobState")) not in states:
        assert time.monotonic() < deadline, f"job {job} still {st}, not {states}"
        time.sleep(0.3)
    return st


def release_requeued(job: str) -> None:
    """Start a job that requeued itself now, not after SLURM's ~2 minute hold, as an operator would."""
    wait_state(job, {"PENDING"})
    assert job_field(job, "Restarts") == "1"
    # slurmd revokes the killed run's credential with a 1 s resolution and refuses a relaunch issued
    # within that second ("already killed, do not launch batch job"): let it pass.
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)


def trainer_pids(run_dir: Path) -> list[int]:
    """The train.py ranks writing to `run_dir`: not srun, torchrun, the batch shell, nor loader workers."""
    found: dict[int, int] = {}  # pid -> parent pid
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if (Path(argv[0]).name.startswith("python") and "torch.distributed.run" not in argv
                and any(a.endswith("train.py") for a in argv) and f"trainer.output_dir={run_dir}" in argv):
            found[int(proc.name)] = ppid
    return sorted(pid for pid, ppid in found.items() if ppid not in found)


def srun_argv(run_dir: Path) -> list[str]:
    """The command line of the srun that started the ranks of `run_dir`."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if Path(argv[0]).name == "srun" and f"trainer.output_dir={run_dir}" in argv:
            return argv
    raise AssertionError(f"no srun process for {run_dir}")


def rank_pid(run_dir: Path, env_entry: str) -> int:
    """The rank of `run_dir` whose environment holds `env_entry` (e.g. SLURM_PROCID=1)."""
    entry = env_entry.encode()
    return next(pid for pid in trainer_pids(run_dir)
                if entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))


def wait_for_step(run_dir: Path, step: int, timeout: float = 180) -> None:
    """Block until rank 0 has logged optimizer step `step`."""
    deadline = time.monotonic() + timeout
    while not ((run_dir / "metrics.jsonl").is_file() and max(losses(run_dir), default=0) >= step):
        assert time.monotonic() < deadline, f"no step {step} in {run_dir}/metrics.jsonl after {timeout}s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(slurm_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sbatch --wait launch/slurm.sbatch` with 2 tasks, trained to the end without interruption."""
    out = tmp_path_factory.mktemp("sbatch-ref")
    res = sbatch(out, *TINY, "trainer.ckpt_every_steps=0", f"trainer.output_dir={out / 'run'}", wait=True)
    log = "".join(p.read_text() for p in out.glob("slurm-*.out"))
    assert res.returncode == 0, f"{res.stderr}\n{log[-4000:]}"
    (out / "job").write_text(res.stdout.strip().split(";")[0])
    return out / "run"


@pytest.mark.slurm
def test_sbatch_trains_two_gloo_ranks_to_the_end(reference: Path) -> None:
    """The job ran 2 ranks in one process group and finished every step of both epochs."""
    info = json.loads((reference / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["slurm_job_id"] == (reference.parent / "job").read_text()
    assert sorted(losses(reference)) == list(range(1, TARGET + 1))
    assert state(reference)["progress"]["step"] == TARGET
    log = next(reference.parent.glob("slurm-*.out")).read_text()
    # rank 0 speaks for the job (srun --label prefixes its lines); the other ranks print nothing at all
    assert "2 tasks" in log and "0: run dir: " in log and "training exited with 0" in log
    assert not any(line.startswith("1: ") for line in log.splitlines()), log


@pytest.mark.slurm
def test_preempted_job_requeues_resumes_and_matches_uninterrupted(reference: Path, tmp_path: Path) -> None:
    """USR1 mid-epoch: one checkpoint, exit 75, self-requeue, resume, bitwise equal final weights."""
    run = tmp_path / "run"
    res = sbatch(tmp_path, *TINY, "trainer.ckpt_every_steps=0", f"trainer.output_dir={run}")
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    log = tmp_path / f"slurm-{job}.out"
    wait_for_step(run, 1)
    # Freeze both ranks so the signal lands mid-epoch however fast this machine is, then let it through.
    ranks = trainer_pids(run)
    assert len(ranks) == 2, ranks
    # The local cluster has no cgroups to show a binding; what SLURM would bind is srun's own request.
    assert "--cpus-per-task=1" in srun_argv(run)
    assert b"SLURM_CPUS_PER_TASK=1" in Path(f"/proc/{ranks[0]}/environ").read_bytes().split(b"\0")
    for pid in ranks:
        os.kill(pid, signal.SIGSTOP)
    try:
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
        deadline = time.monotonic() + 60
        while "got SIGUSR1" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(1)  # srun relays the signal to the (stopped) ranks, where it stays pending
    finally:
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
    release_requeued(job)
    final_state = wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    assert final_state == "COMPLETED", f"{final_state} {job_field(job, 'Reason')}\n{log.read_text()[-4000:]}"

    text = log.read_text()
    assert f"preempted (exit {PREEMPTED_EXIT_CODE}), requeueing job {job}\n" in text, text[-4000:]
    resumed = re.search(r"resumed from \S+ at step (\d+)", text)
    assert resumed, text[-4000:]
    stopped = int(resumed.group(1))
    assert 1 <= stopped < TARGET < steps_per_epoch(run), f"not stopped mid-epoch: step {stopped}"
    assert sorted(losses(run)) == sorted(losses(reference))
    final, ref = state(run), state(reference)
    assert_states_equal(ref["model"], final["model"], "model")
    assert_states_equal(ref["ema"], final["ema"], "ema")


@pytest.mark.slurm
def test_a_frozen_rank_requeues_the_job_without_its_node_and_it_resumes_bitwise(reference: Path,
                                                                               tmp_path: Path) -> None:
    """SIGSTOP on rank 1 mid-epoch: rank 0's watchdog blames rank 1's node and exits 76, the batch script
    requeues the job excluding that node; lifted (this cluster has one node), the job resumes from its last
    checkpoint and ends with the uninterrupted run's weights, bit for bit."""
    run = tmp_path / "run"
    # rank 0 gets each batch 0.3 s late (numerically a no-op), so the freeze lands before the last step; a
    # short grace: a freeze right after a checkpoint leaves rank 0 in the grace of the step after it
    res = sbatch(tmp_path, *TINY, "trainer.ckpt_every_steps=2", "trainer.stall_timeout=10",
                 "trainer.stall_grace=30", f"trainer.output_dir={run}", GCVIT_TEST_SLOW_LOADER="0:0.3")
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    log = tmp_path / f"slurm-{job}.out"
    wait_for_step(run, 3)
    victim = rank_pid(run, "SLURM_PROCID=1")
    os.kill(victim, signal.SIGSTOP)
    deadline = time.monotonic() + 120
    while not list(run.glob("hang/*/verdict.json")):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    (verdict_file,) = run.glob("hang/*/verdict.json")
    verdict = json.loads(verdict_file.read_text())
    os.kill(victim, signal.SIGKILL)  # what srun --wait=60 does to the frozen rank a minute later
    wait_state(job, {"PENDING"})
    node = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True,
                          timeout=30).stdout.split()[0]  # the cluster's one node
    assert verdict["stuck"] == [1] and verdict["nodes"] == [node], verdict
    assert job_field(job, "ExcNodeList") == node and job_field(job, "Restarts") == "1"
    assert f"node fault suspected on {node} (exit " in log.read_text()
    time.sleep(3)  # as release_requeued: slurmd's revoked credential
    subprocess.run(["scontrol", "update", f"JobId={job}", "ExcNodeList=", "StartTime=now"], check=True,
                   timeout=30)
    final_state = wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    text = log.read_text()
    assert final_state == "COMPLETED", f"{final_state} {job_field(job, 'Reason')}\n{text[-4000:]}"
    resumed = re.search(r"resumed from \S+ at step (\d+)", text)
    assert resumed and int(resumed.group(1)) >= 2, text[-4000:]
    assert sorted(losses(run)) == sorted(losses(reference))
    final, ref = state(run), state(reference)
    assert_states_equal(ref["model"], final["model"], "model")
    assert_states_equal(ref["ema"], final["ema"], "ema")


@pytest.mark.slurm
def test_a_killed_rank_ends_the_job_without_requeue(slurm_cluster: str, tmp_path: Path) -> None:
    """SIGKILL on rank 1: rank 0 does not hang, the job fails at once and is not requeued (no signal)."""
    run = tmp_path / "run"
    res = sbatch(tmp_path, "debug=tiny", "trainer.max_steps=1000", f"trainer.output_dir={run}")
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    wait_for_step(run, 1)
    victim = rank_pid(run, "SLURM_PROCID=1")
    os.kill(victim, signal.SIGKILL)
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=90) == "FAILED"
    assert job_field(job, "Restarts") == "0" and not trainer_pids(run)
    assert "requeueing" not in (tmp_path / f"slurm-{job}.out").read_text()


@pytest.mark.slurm
def test_submitit_sweep_members_own_run_dirs_and_requeue_on_usr1(slurm_cluster: str, tmp_path: Path) -> None:
    """`train.py -m hydra/launcher=slurm`, two learning rates: two SLURM jobs in two run dirs; member 0,
    signalled like at its time limit, checkpoints, requeues itself and finishes from its own run dir."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=slurm", *TINY, "optim.lr=1e-3,3e-3",
           f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1"]
    with open(tmp_path / "sweep.log", "w") as out:
        master = subprocess.Popen(cmd, cwd=tmp_path, env=job_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_step(sweep / "0", 1)
        job = json.loads((sweep / "0" / "run_info.json").read_text())["slurm_job_id"]
        # What --signal=USR1@180 of conf/hydra/launcher/slurm.yaml does: USR1 to every task of the job.
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
        release_requeued(job)
        assert master.wait(timeout=240) == 0, (tmp_path / "sweep.log").read_text()[-4000:]
    finally:
        if master.poll() is None:
            master.kill()
    lrs, jobs = [], set()
    for member in ("0", "1"):
        run = sweep / member
        lrs.append(OmegaConf.load(run / ".hydra" / "config.yaml").optim.lr)
        jobs.add(json.loads((run / "run_info.json").read_text())["slurm_job_id"])
        assert sorted(losses(run)) == list(range(1, TARGET + 1)) and state(run)["progress"]["step"] == TARGET
    assert sorted(lrs) == [1e-3, 3e-3] and len(jobs) == 2
    member0_log = "".join(p.read_text() for p in (sweep / ".submitit").glob("*_0/*_0_0_log.*"))
    assert len(re.findall(r"resumed from \S+ at step \d+", member0_log)) == 1, member0_log[-4000:]


def test_torchrun_restarts_the_group_after_a_worker_is_sigkilled(tmp_path: Path) -> None:
    """launch/torchrun.sh, 2 workers, one SIGKILLed after a checkpoint: restart, resume, completion."""
    run = tmp_path / "run"
    log = tmp_path / "torchrun.log"
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--max-restarts", "1", *TINY, "trainer.ckpt_every_steps=2",
           f"trainer.output_dir={run}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=job_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for_step(run, 3)  # the checkpoint of step 2 is complete before step 3 starts
        ranks = trainer_pids(run)
        assert len(ranks) == 2, ranks
        # Freeze both so the kill lands mid-run however fast this machine is; kill rank 1, release rank 0.
        for pid in ranks:
            os.kill(pid, signal.SIGSTOP)
        victim = rank_pid(run, "RANK=1")
        os.kill(victim, signal.SIGKILL)
        for pid in ranks:
            if pid != victim:
                os.kill(pid, signal.SIGCONT)
        assert proc.wait(timeout=240) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]
    assert len(resumed) == 1 and resumed[0] >= 2, text[-4000:]
    assert sorted(losses(run)) == list(range(1, TARGET + 1))
    assert state(run)["progress"]["step"] == TARGET


def test_two_torchrun_agents_rendezvous_as_one_multi_node_job(tmp_path: Path) -> None:
    """`--nnodes 2 --rdzv-endpoint`: two agents (two "nodes" here) form one 2-rank group over c10d."""
    run = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{s.getsockname()[1]}"
    cmd = [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint,
           "--rdzv-id", "two-nodes", *TINY, f"trainer.output_dir={run}"]
    logs = [tmp_path / f"node{n}.log" for n in range(2)]
    nodes = []
    for log in logs:
        with open(log, "w") as out:
            nodes.append(subprocess.Popen(cmd, cwd=tmp_path, env=job_env(), stdout=out,
                                          stderr=subprocess.STDOUT))
    codes = [node.wait(timeout=240) for node in nodes]
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    assert json.loads((run / "run_info.json").read_text())["world_size"] == 2
    assert sorted(losses(run)) == list(range(1, TARGET + 1))


def test_local_sweep_members_train_in_their_own_run_dirs(tmp_path: Path) -> None:
    """`train.py -m` without SLURM: each member gets <sweep dir>/<n>, none resumes another's checkpoint."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "debug=tiny", "trainer.max_steps=2",
           "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep}"]
    res = subprocess.run(cmd, cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from" not in res.stdout
    lrs = [OmegaConf.load(sweep / m / ".hydra" / "config.yaml").optim.lr for m in ("0", "1")]
    assert lrs == [1e-3, 3e-3] and all(state(sweep / m)["progress"]["step"] == 2 for m in ("0", "1"))
