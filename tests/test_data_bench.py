"""python -m gcvit_data.bench runs loaders and formats side by side and prints one JSON line per
configuration; the file-system operations it reports are counted from strace lines naming dataset files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gcvit_data.bench import main
from gcvit_data.bench_fs import count_calls, data_prefixes
from gcvit_data.bench_streams import write_wds
from gcvit_data.demo import write_image_folder
from gcvit_data.readers import load_index


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


def test_bench_format_times_each_form_of_the_same_images(tmp_path: Path, capsys) -> None:
    root = write_image_folder(tmp_path / "flat", train_per_class=6, val_per_class=1, num_classes=2)
    quick = ["--threads", "0", "--batch", "4", "--img-size", "32", "--batches", "2", "--rounds", "1",
             "--warmup", "1", "--rand-augment", "none", "--loaders", "torch"]
    assert main(["--root", str(root / "train"), *quick, "--format", "folder", "shards", "wds", "links"]) == 0
    captured = capsys.readouterr()
    rec = json.loads(captured.out)
    folder, shards = rec["torch_folder_img_s"], rec["torch_shards_img_s"]
    assert folder > 0 and shards > 0 and "torch_img_per_cpu_s" not in rec
    assert rec["torch_shards_vs_folder"] == pytest.approx(shards / folder, rel=0.01)
    assert "packed the train split into 1 shards" in captured.err
    wds = rec["torch_wds_img_s"]  # timm's WebDataset shards of the same images, side by side
    assert wds > 0 and rec["torch_wds_vs_folder"] == pytest.approx(wds / folder, rel=0.01)
    assert "wrote the train split as WebDataset shards" in captured.err
    assert rec["torch_links_img_s"] > 0 and "torch_links_vs_folder" in rec  # prepare --from-kaggle's links

    shards = write_wds({"train": load_index(root, "train")}, tmp_path / "wds")  # a downloaded WDS root
    assert main(["--root", str(shards), *quick]) == 0  # read in place, nothing written
    captured = capsys.readouterr()
    assert json.loads(captured.out)["torch_img_s"] > 0 and "wrote" not in captured.err
    with pytest.raises(SystemExit):
        main(["--root", str(shards), *quick, "--format", "folder", "wds"])
    assert f"{shards} is read as --format wds (in place)" in capsys.readouterr().err


def test_fs_ops_counts_only_the_calls_that_name_dataset_files(tmp_path: Path) -> None:
    """Lines as `strace -f -y` writes them: a path argument, a descriptor's path, a call split in two."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "real").mkdir()
    prefixes = data_prefixes(tmp_path / "ds")
    log = f"""\
12 openat(AT_FDCWD</w>, "{tmp_path}/ds/train/a/x.JPEG", O_RDONLY|O_CLOEXEC) = 3<{tmp_path}/real/a/x.JPEG>
12 newfstatat(3<{tmp_path}/real/a/x.JPEG>, "", {{st_mode=S_IFREG|0644, st_size=2036, ...}}, AT_EMPTY_PATH) = 0
13 openat(AT_FDCWD</w>, "/dev/shm/gcvit-feeder-1.plan", O_RDONLY|O_CLOEXEC) = 4</dev/shm/gcvit-feeder-1.plan>
13 statx(AT_FDCWD</w>, "{tmp_path}/ds/train/b/y.JPEG", AT_STATX_SYNC_AS_STAT <unfinished ...>
14 openat(AT_FDCWD</w>, "/usr/lib/python3/x.py", O_RDONLY) = 5</usr/lib/python3/x.py>
13 <... statx resumed>{{stx_mask=STATX_BASIC_STATS, stx_size=9}}) = 0
"""
    assert count_calls(log, prefixes) == {"open": 1, "stat": 2}
