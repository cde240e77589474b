"""What every rank of the doctor runs: its node's checks (each guarded, so a broken check is a FAIL row, not
a hang) with the facts rank 0 projects from, and the all-reduce every rank joins."""
from __future__ import annotations

import argparse
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from gcvit.config import Config
from gcvit.doctor import checks, cluster
from gcvit.doctor.checks import FAIL, OK, Row
from gcvit.engine import distributed
from gcvit.engine.distributed import DistEnv
from gcvit_data.resolve import resolve_data


@dataclass
class Facts:
    """What one rank measured that rank 0 combines."""

    train_files: int = 0
    classes: int | None = None  # None: no dataset index (synthetic loader, or it failed)
    read: dict[str, float] | None = None  # timed_read() of this rank's sample
    jpeg: Path | None = None  # a JPEG of the dataset for the DALI decode check


def guarded(check: str, fn: Callable[..., Row | list[Row]], *args: Any) -> list[Row]:
    """The rows of fn(*args), or one FAIL row when the check itself breaks: a broken node must show up as a
    row, not as a traceback on one rank while the others wait for it."""
    try:
        out = fn(*args)
    except Exception as e:
        lines = str(e).strip().splitlines()
        return [Row(check, FAIL, f"the check raised {type(e).__name__}" + (f": {lines[0]}" if lines else ""))]
    return out if isinstance(out, list) else [out]


def _dataset(cfg: Config, env: DistEnv, args: argparse.Namespace, facts: Facts) -> Row:
    """The index loads and a sample of it is read; fills `facts` for rank 0's projections."""
    data = cfg.data
    if data.loader == "synthetic":
        facts.classes = data.synthetic_classes
        return Row("data-index", OK, "data.loader=synthetic: random tensors, no files read")
    if data.root or data.demo:
        # the demo dataset is generated once by rank 0, as train.py does
        data = resolve_data(data, is_main=env.is_main, local_rank=env.local_rank,
                            broadcast=distributed.broadcast_object)
    row, index = checks.dataset_index(data.root, data.index_cache, data.index_dir)
    if index is not None:
        facts.train_files, facts.classes = len(index), len(index.classes)
        try:
            facts.read = checks.timed_read(index, args.sample_files, data.workers, seed=env.rank)
        except OSError as e:
            return Row("data-index", FAIL, f"cannot read {e.filename} ({e.strerror}); run python -m "
                       f"gcvit_data.verify {data.root} --write-index DIR and train on that clean index "
                       "(data.index_dir=DIR)")
        facts.jpeg = next((index.path(i) for i in range(min(len(index), 100))
                           if index.files[i].lower().endswith((".jpeg", ".jpg"))), None)
    return row


def node_rows(cfg: Config, env: DistEnv, args: argparse.Namespace) -> tuple[list[Row], Facts]:
    """This rank's node: software, GPUs, the dataset (index and a timed read), DALI, the launcher."""
    facts = Facts()
    rows = guarded("cuda", checks.software)
    rows += guarded("gpus", checks.gpus, cfg.trainer.device, cfg.trainer.precision)
    rows += guarded("data-index", _dataset, cfg, env, args, facts)
    rows += guarded("dali", checks.dali_decode, facts.jpeg)
    rows += guarded("launcher", checks.launcher, env.rank, env.world_size, env.local_rank)
    rows += guarded("nccl-env", checks.nccl_env, cfg.trainer.device)
    return rows, facts


def measure_cluster(env: DistEnv, args: argparse.Namespace) -> tuple[int, cluster.AllReduce | None]:
    """Node count and the all-reduce measurement; a collective that every rank calls."""
    if not env.distributed:
        return 1, None
    hosts: list[Any] = [None] * env.world_size
    dist.all_gather_object(hosts, socket.gethostname())
    cuda = env.device.type == "cuda"
    mb = args.allreduce_mb or (256.0 if cuda else 32.0)
    return len(set(hosts)), cluster.measure_allreduce(env.device, mb, iters=20 if cuda else 5)
