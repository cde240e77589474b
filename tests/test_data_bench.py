"""python -m gcvit_data.bench runs both loaders side by side and prints one JSON line per configuration."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gcvit_data.bench import main
from gcvit_data.demo import write_image_folder


def test_bench_prints_both_loaders_and_the_ratio(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_image_folder(tmp_path / "flat", train_per_class=8, val_per_class=1, num_classes=2)
    out = tmp_path / "results" / "bench.json"
    assert main(["--root", str(root / "train"), "--threads", "1", "--batch", "4", "--img-size", "32",
                 "--batches", "2", "--rounds", "1", "--warmup", "1", "--rand-augment", "none",
                 "--json-out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["rand_augment"] is None and rec["dali_img_s"] > 0 and rec["torch_img_s"] > 0
    assert rec["ratio"] == pytest.approx(rec["dali_img_s"] / rec["torch_img_s"], rel=0.01)
    assert rec["dali_img_per_cpu_s"] > 0 and rec["torch_img_per_cpu_s"] > 0
    report = json.loads(out.read_text())  # what benchmarks/results records: the rows and where they ran
    assert report["results"] == [rec] and report["torch"] == torch.__version__ and report["dali"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_gpu_bench_without_a_gpu_is_one_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--root", "unused", "--dali-device", "gpu"])
    assert "--dali-device gpu needs a CUDA GPU" in capsys.readouterr().err
