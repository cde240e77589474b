"""The DALI feeder in worker processes: the same batches as inline, the pass plan, errors from workers."""
from __future__ import annotations

import gc
import itertools
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from gcvit_data.config import AugConfig, DataConfig
from gcvit_data.demo import write_image_folder
from gcvit_data.feeder import PassPlan
from gcvit_data.index import DataError
from gcvit_data.loaders import build_loader

RA = "rand-m9-mstd0.5-inc1"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes of 10 train and 3 val images, sides 24..80 px."""
    return write_image_folder(tmp_path_factory.mktemp("jpegs"), train_per_class=10, val_per_class=3,
                              num_classes=3, sizes=(24, 80), seed=2)


def _loader(root: Path, feeder_workers: int, *, split: str = "train", batch: int = 4, rank: int = 0,
            world: int = 1):
    data = DataConfig(root=str(root), loader="dali", batch_size=batch, workers=1, prefetch=2,
                      feeder_workers=feeder_workers)
    return build_loader(data, AugConfig(rand_augment=RA), split=split, img_size=24, seed=5, rank=rank,
                        world_size=world, device=torch.device("cpu"))


def _flat(batches) -> list[tuple[int, int, torch.Tensor]]:
    return [(int(i), int(y), x.clone()) for b in batches for i, y, x in zip(b.ids, b.labels, b.images)]


def _assert_same(a, b) -> None:
    assert [(i, y) for i, y, _ in a] == [(i, y) for i, y, _ in b]
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(a, b))  # bitwise


def test_workers_feed_what_the_training_thread_fed(root: Path) -> None:
    """Worker processes (2 and 3 of them) and the inline feeder give bitwise equal batches: a whole epoch,
    a mid-epoch resume at another world size, the epoch after an abandoned pass, and val."""
    inline = _loader(root, 0)
    inline.set_epoch(2)
    ref = _flat(inline)
    assert inline.feeder_pids() == []
    for workers in (2, 3):
        par = _loader(root, workers)
        par.set_epoch(2)
        _assert_same(_flat(par), ref)
        pids = par.feeder_pids()
        assert len(pids) == workers and os.getpid() not in pids  # the feeder really ran elsewhere
    state = {"epoch": 2, "position": 8, "seed": 5, "num_samples": 30}
    tail = []
    for rank in range(2):  # 2 ranks x 2 resume what 1 rank x 4 started
        two = _loader(root, 2, batch=2, rank=rank, world=2)
        two.set_epoch(2)
        two.load_state_dict(state)
        tail += _flat(two)
    by_id = {i: x for i, _, x in ref}
    assert len(tail) == len(ref) - 8 and {i for i, _, _ in tail} == {i for i, _, _ in ref[8:]}
    assert all(torch.equal(x, by_id[i]) for i, _, x in tail)

    par.set_epoch(3)
    list(itertools.islice(iter(par), 1))  # abandoned after one batch: the workers were ahead
    par.set_epoch(4)
    list(itertools.islice(iter(par), len(par)))  # every batch taken, the pass's end never asked for
    par.set_epoch(2)
    _assert_same(_flat(par), ref)
    _assert_same(_flat(_loader(root, 2, split="val")), _flat(_loader(root, 0, split="val")))


def test_a_dropped_loader_is_freed_at_once(root: Path) -> None:
    """No reference cycle holds a loader (e.g. through the pass end its runner thread reports): one that only
    the garbage collector frees can be freed in a forked process (a DataLoader worker), where destroying its
    DALI pipeline waits forever for threads the fork did not copy."""
    gc.disable()
    try:
        loader = _loader(root, 0)
        _flat(loader)  # a whole pass: its end arrives from the runner thread as StopIteration
        ref = weakref.ref(loader)
        del loader
        assert ref() is None
    finally:
        gc.enable()


def test_pass_plan_rows_are_what_the_workers_read() -> None:
    plan = PassPlan()
    try:
        assert plan.append(1, 0, 7) == 0 and plan.append(1, 12, 4) == 1
        plan.end(0)
        assert plan.read(0) == (1, 0, 0) and plan.read(1) == (1, 12, 4)
        plan.clear()
        assert plan.append(3, 0, 2) == 0 and plan.read(0) == (3, 0, 2)
    finally:
        plan.remove()
    assert not Path(plan.path).exists()


def test_a_file_gone_after_indexing_is_one_line_from_a_worker(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "gone", train_per_class=4, val_per_class=1, num_classes=2)
    loader = _loader(root, 2, batch=8)
    victim = sorted((root / "train").rglob("*.JPEG"))[5]
    victim.unlink()
    with pytest.raises(DataError) as err:
        list(loader)
    msg = str(err.value)
    assert f"cannot read {victim}" in msg and "gcvit_data.verify" in msg and "\n" not in msg


@pytest.mark.parametrize("feeder_workers", [0, 2])
def test_a_file_dali_cannot_decode_is_named(tmp_path: Path, feeder_workers: int) -> None:
    """A JPEG whose header reads but whose data ends right after the scan header: DALI fails, not the
    feeder, and the loader names the file among the batches in flight."""
    root = write_image_folder(tmp_path / "bad", train_per_class=4, val_per_class=1, num_classes=2)
    victim = sorted((root / "train").rglob("*.JPEG"))[2]
    raw = victim.read_bytes()
    victim.write_bytes(raw[:raw.index(b"\xff\xda") + 12])
    with pytest.raises(DataError) as err:
        list(_loader(root, feeder_workers, batch=4))
    msg = str(err.value)
    assert f"cannot decode {victim}" in msg and "\n" not in msg


def test_bench_feeder_prints_the_training_thread_cost(root: Path, capsys: pytest.CaptureFixture) -> None:
    from gcvit_data.bench_feeder import main

    assert main(["--root", str(root / "train"), "--feeder-workers", "0", "1", "--batch", "4", "--img-size",
                 "24", "--step-ms", "1", "--batches", "2", "--warmup", "3"]) == 0
    floor, *lines = [json.loads(ln) for ln in capsys.readouterr().out.strip().splitlines()]
    assert floor["loader"] == "synthetic" and floor["main_us_per_img_median"] > 0
    assert [(r["loader"], r["feeder_workers"], r["step"]) for r in lines] == [("dali", 0, "model"),
                                                                             ("dali", 1, "model")]
    assert all(r["main_us_per_img_median"] > 0 and r["wait_us_per_img_median"] >= 0 for r in lines)
    assert all(r["runner_us_per_img"] > 0 for r in lines)  # DALI was driven off the training thread
    # and the training thread only collects a finished batch: a few calls, none into torch or DALI
    assert all(r["main_library_calls_per_batch"] == 0 and 0 < r["main_calls_per_batch"] <= 12 for r in lines)
    assert floor["main_library_calls_per_batch"] > 0
    base = floor["main_us_per_img_median"]
    assert all(r["over_floor_us_per_img"] == round(r["main_us_per_img_median"] - base, 2) for r in lines)


_KEPT: list = []


def _rank_keeping_its_loader(rank: int, root: str) -> None:
    loader = _loader(Path(root), 1)
    list(itertools.islice(iter(loader), 1))
    _KEPT.append(loader)  # alive until the process ends: its exit must still close the feeder processes
    print(loader.plan.path, flush=True)


def test_a_torch_multiprocessing_rank_exits_with_a_live_loader(root: Path, tmp_path: Path) -> None:
    """A rank started by torch.multiprocessing ends with os._exit after joining its children: the feeder
    pool is closed and the plan file removed before that (it hung, and leaked the file, otherwise)."""
    code = ("import sys; import torch.multiprocessing as mp; from tests.test_data_feeder import "
            "_rank_keeping_its_loader as f\nif __name__ == '__main__': mp.spawn(f, args=(sys.argv[1],))")
    res = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    plan = res.stdout.strip().splitlines()[-1]
    assert plan.endswith(".plan") and not Path(plan).exists()


SIGNALLED = """
import os, signal, sys, time, torch
from pathlib import Path
from gcvit_data.config import AugConfig, DataConfig
from gcvit_data.demo import write_image_folder
from gcvit_data.loaders import build_loader
if __name__ == "__main__":
    root = write_image_folder(Path(sys.argv[1]), train_per_class=16, val_per_class=1, num_classes=2)
    data = DataConfig(root=str(root), loader="dali", batch_size=4, workers=1, feeder_workers=2)
    signal.signal(signal.SIGUSR1, lambda *a: None)  # the trainer's handler: save at the next step
    loader = build_loader(data, AugConfig(), split="train", img_size=32, seed=0, rank=0, world_size=1,
                          device=torch.device("cpu"))
    batches = iter(loader)
    next(batches)
    pids = loader.feeder_pids()
    os.killpg(os.getpgrp(), signal.SIGUSR1)  # SLURM's preemption warning goes to every process of the job
    time.sleep(0.5)
    alive = all(os.path.exists(f"/proc/{p}") for p in pids)
    print("batches", 1 + sum(1 for _ in batches), "workers alive", alive)
"""


def test_a_preemption_signal_to_the_whole_job_leaves_the_feeder_workers_running(tmp_path: Path) -> None:
    """USR1/TERM reach every process of a SLURM job: the workers must leave them to the trainer, whose
    handler saves and ends the pool, or the pipeline would wait forever for the killed workers' batches."""
    script = tmp_path / "signalled.py"
    script.write_text(SIGNALLED)
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "jpegs")], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1], timeout=300,
                         start_new_session=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "batches 8 workers alive True" in res.stdout
