"""GPU tier, doctor: on a CUDA machine the GPU rows are OK (CUDA stack with its driver, GPUs with bf16, DALI's
nvJPEG decode) and, with two GPUs or more, the all-reduce row is measured over NCCL."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gcvit_data.demo import write_image_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("jpegs"), train_per_class=8, val_per_class=2,
                              num_classes=3, sizes=(48, 160), seed=4)


def _doctor(root: Path, out: Path, *launcher: str) -> dict[str, dict]:
    cmd = [*(launcher or [sys.executable]), "-m", "gcvit.doctor", "debug=tiny", "trainer.device=cuda",
           "trainer.precision=bf16", f"data.root={root}", f"trainer.output_dir={out.parent / 'run'}",
           "--json", str(out)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    print(res.stdout)  # the table, in the kit's log
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {r["check"]: r for r in json.loads(out.read_text())["rows"]}


def test_gpu_rows_are_ok_on_a_cuda_machine(root: Path, tmp_path: Path) -> None:
    rows = _doctor(root, tmp_path / "doctor.json")
    cuda = rows["cuda"]
    assert cuda["status"] == "OK" and cuda["values"]["driver"] and cuda["values"]["nccl"]
    assert cuda["values"]["cudnn"] == torch.backends.cudnn.version()
    gpus = rows["gpus"]
    assert gpus["status"] == "OK", gpus["detail"]
    assert gpus["values"]["count"] == torch.cuda.device_count()
    assert gpus["values"]["bf16"] is torch.cuda.is_bf16_supported()
    assert gpus["values"]["names"] == [torch.cuda.get_device_name(0)]
    if importlib.util.find_spec("nvidia.dali") is not None:
        assert rows["dali"]["status"] == "OK", rows["dali"]["detail"]
        assert rows["dali"]["values"]["gpu_decode"] is True and "nvJPEG" in rows["dali"]["detail"]
    else:
        assert rows["dali"]["status"] == "WARN"
    assert rows["interconnect"]["status"] == "OK"


def test_nccl_allreduce_between_two_gpus(root: Path, tmp_path: Path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU: an NCCL all-reduce needs two (a multi-GPU node runs this)")
    rows = _doctor(root, tmp_path / "doctor.json", sys.executable, "-m", "torch.distributed.run",
                   "--standalone", "--nproc_per_node=2")
    ar = rows["allreduce"]["values"]
    assert ar["backend"] == "nccl" and ar["ranks"] == 2 and ar["busbw_gbps"] > 0
    assert rows["grad-sync"]["values"]["seconds"] > 0
