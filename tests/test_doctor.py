"""`python -m gcvit.doctor` on CPU: every row on generated JPEG data, the blockers (missing data, a full disk,
an invalid config) as FAIL rows with a non-zero exit, the JSON report, a 2-rank gloo all-reduce under
torchrun, and the pieces the rows are computed from (busbw, topology, checkpoint size, merging ranks)."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.utils import ModelEmaV3

import gcvit
from gcvit.doctor import checks, cli, cluster, projections
from gcvit.doctor.checks import FAIL, OK, WARN, Row
from gcvit.engine import optim
from gcvit_data.demo import write_image_folder

REPO = Path(__file__).resolve().parents[1]
ROWS = ("config", "torch", "cuda", "gpus", "dali", "launcher", "nccl-env", "interconnect", "allreduce",
        "grad-sync", "data-index", "data-read", "data-epoch", "disk", "wandb")
TINY = ["debug=tiny"]  # the smallest model: the rows that build it on the meta device stay fast


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes, 8 train and 2 val real JPEGs each."""
    return write_image_folder(tmp_path_factory.mktemp("jpegs"), train_per_class=8, val_per_class=2,
                              num_classes=3, sizes=(40, 90), seed=1)


def _run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str, dict[str, str]]:
    """cli.main in this process: exit code, stdout, stderr and {check: status} of the printed table."""
    code = cli.main(args)
    out, err = capsys.readouterr()
    table = {ln.split()[0]: ln.split()[1] for ln in out.splitlines()[2:] if ln[:1].strip()
             and ln.split()[1:2] and ln.split()[1] in (OK, WARN, FAIL)}
    return code, out, err, table


def test_plain_run_on_cpu_prints_every_row_and_exits_0(root: Path, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "gcvit.doctor", *TINY, f"data.root={root}",
                          f"trainer.output_dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("gcvit.doctor: 1 rank(s) on 1 node(s)")
    for check in ROWS:
        assert sum(ln.startswith(f"{check} ") for ln in lines) == 1, (check, res.stdout)
    assert "24 train / 6 val images, 3 classes" in res.stdout
    if not torch.cuda.is_available():
        assert "GPU decode skipped: no GPU" in res.stdout
    assert f"{len(ROWS)} checks:" in lines[-1] and "0 FAIL" in lines[-1]
    assert res.stderr == ""
    assert not (tmp_path / "run").exists()  # a preflight check writes nothing into the run directory


def test_missing_data_root_is_a_fail_row_and_one_line(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-dataset"
    code, out, err, table = _run([*TINY, f"data.root={missing}", f"trainer.output_dir={tmp_path}"], capsys)
    assert code == 1
    assert table["data-index"] == FAIL
    assert err.splitlines() == [f"doctor: FAIL data-index: data.root {missing} does not exist or is not a "
                                "directory"]
    assert "data-read" not in table  # nothing to time without an index


def test_an_unreadable_file_is_a_fail_row_naming_it(tmp_path: Path, capsys) -> None:
    data = write_image_folder(tmp_path / "data", train_per_class=2, val_per_class=1, num_classes=2, seed=2)
    gone = data / "train" / "00_circle" / "lost.JPEG"
    gone.symlink_to(tmp_path / "unmounted" / "lost.JPEG")  # a link into storage that is not there
    code, _, err, table = _run([*TINY, f"data.root={data}", f"trainer.output_dir={tmp_path}"], capsys)
    assert code == 1 and table["data-index"] == FAIL
    assert err.startswith(f"doctor: FAIL data-index: cannot read {gone} (No such file or directory)")


def test_unset_root_fails_the_config_and_the_data(tmp_path: Path, capsys) -> None:
    code, _, err, table = _run(["data=imagenet", f"trainer.output_dir={tmp_path}"], capsys)
    assert code == 1 and table["config"] == FAIL and table["data-index"] == FAIL
    assert "data.root is unset; pass data.root=ROOT" in err


def test_an_unknown_model_fails_its_rows_without_a_traceback(root: Path, tmp_path: Path, capsys) -> None:
    code, out, err, table = _run([*TINY, "model.name=gcvit_huge", f"data.root={root}",
                                  f"trainer.output_dir={tmp_path}"], capsys)
    assert code == 1 and table["config"] == FAIL and "model.name='gcvit_huge' is invalid" in err
    assert table["disk"] == FAIL and table["data-read"] == OK  # the checks that need no model still run
    assert "Traceback" not in out + err


def test_full_disk_is_a_fail_row(root: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checks.shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(real.total, real.total - 10**6, 10**6))
    code, out, err, table = _run([*TINY, f"data.root={root}", f"trainer.output_dir={tmp_path}"], capsys)
    assert code == 1 and table["disk"] == FAIL
    assert err.startswith("doctor: FAIL disk:") and "lower trainer.keep_checkpoints" in err
    assert len(err.splitlines()) == 1


def test_keep_checkpoints_scales_the_need(root: Path, tmp_path: Path, capsys) -> None:
    """The need is (keep + 2) checkpoints; the same checkpoint size whatever keep is."""
    rows = {}
    for keep in (1, 5):
        out = tmp_path / f"{keep}.json"
        assert cli.main([*TINY, f"data.root={root}", f"trainer.output_dir={tmp_path}",
                            f"trainer.keep_checkpoints={keep}", "--json", str(out)]) == 0
        doc = json.loads(out.read_text())
        rows[keep] = next(r["values"] for r in doc["rows"] if r["check"] == "disk")
    capsys.readouterr()
    size = rows[1]["checkpoint_bytes"]
    assert rows[5]["checkpoint_bytes"] == size
    assert rows[1]["needed_bytes"] == 3 * size and rows[5]["needed_bytes"] == 7 * size


def test_checkpoint_size_estimate_matches_a_real_checkpoint(tmp_path: Path) -> None:
    """What disk_row projects against torch.save of what checkpoint_state() holds: model, EMA, AdamW."""
    cfg = cli.compose(TINY)
    size = cfg.model.img_size
    model = gcvit.create_model(cfg.model.name, num_classes=3, img_size=size, **cfg.model.overrides)
    ema = ModelEmaV3(model, decay=0.9)
    opt = optim.build_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8, impl="torch")
    model(torch.randn(2, 3, size, size)).sum().backward()
    opt.step()
    buf = io.BytesIO()
    state = {"model": model.state_dict(), "ema": ema.module.state_dict(), "optimizer": opt.state_dict()}
    torch.save(state, buf)
    params = projections.model_bytes(cfg, 3)[0]
    assert params == sum(p.numel() for p in model.parameters())
    estimate = projections.disk_row(cfg, 3).values["checkpoint_bytes"]
    assert abs(estimate - buf.tell()) / buf.tell() < 0.1, (estimate, buf.tell())


def test_json_report(root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "deep" / "doctor.json"
    code, _, _, table = _run([*TINY, f"data.root={root}", f"trainer.output_dir={tmp_path}",
                              "--json", str(out), "--sample-files", "5"], capsys)
    doc = json.loads(out.read_text())
    assert code == 0 and doc["ok"] is True and doc["world_size"] == 1
    assert [r["check"] for r in doc["rows"]] == list(ROWS)
    assert {r["check"]: r["status"] for r in doc["rows"]} == table
    values = {r["check"]: r["values"] for r in doc["rows"]}
    assert values["data-index"]["classes"] == 3 and values["data-index"]["train_files"] == 24
    assert values["data-read"]["files"] == 5 and values["data-read"]["bytes"] > 0
    assert values["data-epoch"]["train_files"] == 24


def test_storage_slower_than_the_training_warns(root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "doctor.json"
    code, _, _, table = _run([*TINY, f"data.root={root}", f"trainer.output_dir={tmp_path}",
                              "--json", str(out), "--target-img-s", "1e9"], capsys)
    assert code == 0 and table["data-epoch"] == WARN
    row = next(r for r in json.loads(out.read_text())["rows"] if r["check"] == "data-epoch")
    assert "storage is the bottleneck" in row["detail"]
    epoch = row["values"]
    assert epoch["needed_img_s"] == 1e9 * max(1, torch.cuda.device_count())
    assert epoch["read_seconds"] > epoch["train_seconds"]


def test_bad_arguments_exit_2_with_one_line(capsys) -> None:
    cases = ((["data.rot=1"], "the overrides do not compose"), (["foo"], "'foo' is not an override"))
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(args)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"doctor: {message}") and len(err.splitlines()) == 1


@pytest.mark.slow
def test_torchrun_two_ranks_measure_the_allreduce_and_rank_0_prints(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "doctor.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gcvit.doctor", *TINY, f"data.root={root}", f"trainer.output_dir={tmp_path}",
           "--json", str(out), "--sample-files", "6", "--allreduce-mb", "4"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("gcvit.doctor: 2 rank(s) on 1 node(s)") == 1
    assert sum(ln.startswith("allreduce ") for ln in res.stdout.splitlines()) == 1
    assert "gloo, 2 ranks on 1 node(s), 4 MB: busbw" in res.stdout
    values = {r["check"]: r["values"] for r in json.loads(out.read_text())["rows"]}
    ar = values["allreduce"]
    assert len(ar["rank_seconds"]) == 2 and all(s > 0 for s in ar["rank_seconds"])
    assert ar["busbw_gbps"] == pytest.approx(ar["algbw_gbps"])  # 2(n-1)/n = 1 for two ranks
    assert ar["algbw_gbps"] == pytest.approx(4 / 1e3 / max(ar["rank_seconds"]))
    assert values["data-read"]["files"] == 12  # each rank read its own sample at the same time
    assert values["grad-sync"]["seconds"] > 0
    assert "rank 0 of 2" in res.stdout and "torchrun" in res.stdout


@pytest.mark.slow
def test_srun_tasks_are_ranks(slurm_cluster: str, root: Path, tmp_path: Path) -> None:
    """Two srun tasks on the local one-node cluster (launch/local_slurm.sh) join one gloo group."""
    out = tmp_path / "doctor.json"
    path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    cmd = ["srun", "--ntasks=2", "--time=5", sys.executable, "-m", "gcvit.doctor", *TINY, f"data.root={root}",
           f"trainer.output_dir={tmp_path}", "--json", str(out), "--allreduce-mb", "4"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("gcvit.doctor: 2 rank(s)") == 1
    values = {r["check"]: r["values"] for r in json.loads(out.read_text())["rows"]}
    assert values["launcher"]["kind"] == "srun" and values["launcher"]["SLURM_NTASKS"] == "2"
    assert values["allreduce"]["ranks"] == 2 and len(values["allreduce"]["rank_seconds"]) == 2


def test_busbw_follows_nccl_tests() -> None:
    m = cluster.AllReduce(ranks=8, megabytes=1000.0, rank_seconds=[0.5, 1.0], backend="nccl")
    assert m.algbw == pytest.approx(1.0) and m.busbw == pytest.approx(1.75)
    # one all-reduce of 1 GB over 8 ranks at 1.75 GB/s busbw takes the measured second
    assert cluster.allreduce_seconds(1e9, 8, m.busbw) == pytest.approx(1.0)


def _matrix(cells: list[list[str]]) -> str:
    n = len(cells)
    head = "\t" + "\t".join(f"GPU{i}" for i in range(n)) + "\tCPU Affinity"
    rows = [f"GPU{i}\t" + "\t".join(c) + "\t0-63" for i, c in enumerate(cells)]
    return "\n".join([head, *rows, "", "Legend:", "  NV#  = Connection traversing a bonded set of # NVLinks"])


def test_nvlink_topology_from_nvidia_smi_matrix() -> None:
    nv = [["X" if i == j else "NV18" for j in range(8)] for i in range(8)]
    pcie = [["X" if i == j else "SYS" for j in range(4)] for i in range(4)]
    pairs = [["X", "NV4", "SYS", "SYS"], ["NV4", "X", "SYS", "SYS"], ["SYS", "SYS", "X", "NV4"],
             ["SYS", "SYS", "NV4", "X"]]
    assert cluster.nvlink_topology(_matrix(nv)) == "NVSwitch"
    assert cluster.nvlink_topology(_matrix(pcie)) is None
    assert cluster.nvlink_topology(_matrix(pairs)) == "NVLink"
    assert cluster.nvlink_topology(None) is None


def test_infiniband_ports_read_sysfs(tmp_path: Path, monkeypatch) -> None:
    for dev, state in (("mlx5_0", "4: ACTIVE"), ("mlx5_1", "4: ACTIVE"), ("mlx5_2", "1: DOWN")):
        port = tmp_path / dev / "ports" / "1"
        port.mkdir(parents=True)
        (port / "state").write_text(state + "\n")
        (port / "rate").write_text("400 Gb/sec (4X NDR)\n")
    monkeypatch.setattr(cluster, "IB_ROOT", tmp_path)
    assert cluster.infiniband_ports() == [("mlx5_0/1", 400.0), ("mlx5_1/1", 400.0)]


def test_merge_reports_the_worst_rank() -> None:
    ok = [Row("gpus", OK, "8 x H100"), Row("dali", OK, "decoded")]
    bad = [Row("gpus", OK, "8 x H100"), Row("dali", FAIL, "cannot decode")]
    merged = cli.merge([ok, bad, bad], ["a", "b", "c"])
    assert merged[0] == ok[0]
    assert merged[1].status == FAIL and merged[1].detail == "rank 1 on b (2 of 3 ranks): cannot decode"


def test_launcher_rows(monkeypatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert checks.launcher(0, 1, 0).detail.startswith("plain: rank 0 of 1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    row = checks.launcher(0, 1, 0)
    assert row.status == FAIL and "start the tasks with srun" in row.detail
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "node7")
    monkeypatch.setenv("MASTER_PORT", "29500")
    row = checks.launcher(3, 4, 1)
    assert row.status == OK and row.detail == "torchrun: rank 3 of 4, local rank 1, rendezvous node7:29500"


def test_nccl_env_row(monkeypatch) -> None:
    """What launch/nccl_env.sh sets, as the launchers leave it; off is a WARN on CUDA only."""
    for new, old, _ in checks.NCCL_DIAGNOSTICS:
        monkeypatch.delenv(new, raising=False)
        monkeypatch.delenv(old, raising=False)
    assert checks.nccl_env("cpu").status == OK
    row = checks.nccl_env("cuda")  # unset: torch's defaults record, dump and end the process
    assert row.status == OK and row.detail == "none set; unset: torch's defaults (on)"
    monkeypatch.setenv("TORCH_NCCL_DUMP_ON_TIMEOUT", "0")
    row = checks.nccl_env("cuda")
    assert row.status == WARN and row.detail.startswith("TORCH_NCCL_DUMP_ON_TIMEOUT set to 0 (off)")
    monkeypatch.delenv("TORCH_NCCL_DUMP_ON_TIMEOUT")
    launched = subprocess.run(["bash", "-c", f"source {REPO}/launch/nccl_env.sh && env"], capture_output=True,
                              text=True, check=True).stdout.splitlines()
    for line in launched:
        name, _, value = line.partition("=")
        if name.startswith("TORCH_"):
            monkeypatch.setenv(name, value)
    row = checks.nccl_env("cuda")
    assert row.status == OK and row.detail == ("TORCH_FR_BUFFER_SIZE=2000, TORCH_NCCL_DUMP_ON_TIMEOUT=1, "
                                               "TORCH_NCCL_ASYNC_ERROR_HANDLING=3")
    monkeypatch.delenv("TORCH_FR_BUFFER_SIZE")
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "500")  # the older name counts
    assert checks.nccl_env("cuda").values["TORCH_FR_BUFFER_SIZE"] == "500"


def test_wandb_online_without_network_advises_offline(monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    row = checks.wandb_row("online")
    assert row.status == WARN and "logger.wandb.mode=offline" in row.detail
    assert checks.wandb_row("offline").status == OK


def test_target_rate_reads_recorded_benchmarks(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(projections, "RESULTS", tmp_path)
    assert projections.target_rate("gcvit_tiny", None) == (projections.FALLBACK_IMG_S,
                                                           "default; set --target-img-s")
    for name, rate in (("eager", 1255.0), ("compiled", 1716.8)):
        (tmp_path / f"gpu-gcvit_tiny-bf16-{name}-1.json").write_text(json.dumps(
            {"device_name": "NVIDIA H200", "result": {"ours": {"train_img_s": rate}}}))
    rate, source = projections.target_rate("gcvit_tiny", None)
    assert rate == 1716.8 and "compiled" in source and "H200" in source
    assert projections.target_rate("gcvit_tiny", 900.0) == (900.0, "--target-img-s")


def test_a_pack_is_read_through_its_shards(root: Path, tmp_path: Path, capsys) -> None:
    from gcvit_data.pack import pack

    pack(root, tmp_path / "pack", shard_size=1 << 20, progress=False)
    code, out, err, table = _run([*TINY, f"data.root={tmp_path / 'pack'}",
                                  f"trainer.output_dir={tmp_path / 'run'}"], capsys)
    assert code == 0 and table["data-index"] == OK and table["data-read"] in (OK, WARN), out + err
    assert "24 train / 6 val images, 3 classes" in " ".join(out.split())
    assert "24 files" in out  # every sample read, from the shards
