"""Two real processes (gloo): each train sample once per epoch, each val image once, also across a resume."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gcvit_data.config import AugConfig, DataConfig
from gcvit_data.demo import write_image_folder
from gcvit_data.loaders import build_loader
from gcvit_data.sampler import epoch_permutation

pytestmark = pytest.mark.slow
WORLD, BATCH, TRAIN, VAL = 2, 3, 5 * 11, 5 * 3  # 55 train images: 55 mod 6 = 1 sample dropped per epoch


def _worker(rank: int, root: str, out: str) -> None:
    """One rank: a straight epoch 0, epoch 1 cut after 2 micro-batches and resumed by fresh loaders, val."""
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    data = DataConfig(root=root, loader="dali", batch_size=BATCH, workers=1)

    def loader(split: str):
        return build_loader(data, AugConfig(rand_augment=None), split=split, img_size=16, seed=3, rank=rank,
                            world_size=WORLD, device=torch.device("cpu"))

    def ids(batches) -> list[int]:
        return [int(i) for b in batches for i in b.ids]

    train = loader("train")
    train.set_epoch(0)
    record = {"epoch0": ids(train), "len": len(train)}
    train.set_epoch(1)
    record["epoch1_head"] = ids(itertools.islice(iter(train), 2))
    state = [train.state_dict()]
    dist.broadcast_object_list(state, src=0)  # the trainer saves rank 0's state and every rank loads it
    resumed = loader("train")
    resumed.set_epoch(1)
    resumed.load_state_dict(state[0])
    record["epoch1_tail"] = ids(resumed)
    val = loader("val")
    record["val"] = ids(val)
    record["val_batches"] = len(val)
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_exactly_once_across_resume(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "jpegs", train_per_class=11, val_per_class=3, num_classes=5,
                              sizes=(20, 48))
    mp.spawn(_worker, args=(str(root), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    kept = TRAIN - TRAIN % (WORLD * BATCH)
    epoch0 = [i for r in ranks for i in r["epoch0"]]
    assert len(epoch0) == len(set(epoch0)) == kept and set(ranks[0]["epoch0"]).isdisjoint(ranks[1]["epoch0"])
    assert set(epoch0) == set(epoch_permutation(TRAIN, 3, 0)[:kept].tolist())  # the documented tail drop
    epoch1 = [i for r in ranks for i in r["epoch1_head"] + r["epoch1_tail"]]
    assert len(epoch1) == len(set(epoch1)) == kept  # the resume neither repeats nor skips a sample
    assert set(epoch1) == set(epoch_permutation(TRAIN, 3, 1)[:kept].tolist())
    assert all(r["len"] == kept // (WORLD * BATCH) for r in ranks)

    val = [i for r in ranks for i in r["val"]]
    assert sorted(val) == list(range(VAL))  # no padded duplicates
    assert [r["val_batches"] for r in ranks] == [3, 3]
