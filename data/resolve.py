"""The dataset a run reads: data.root as configured, its node-local copy (data.cache_dir), or the demo.

Called by every rank of training and mode=eval before the loaders are built. It knows the run only through
its DataConfig, the rank's place and a broadcast passed in (gcvit.engine.distributed.broadcast_object: the
data package's pipeline imports nothing of gcvit, as tests/test_architecture.py checks).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from gcvit_data.config import DataConfig
from gcvit_data.demo import ensure_demo_dataset
from gcvit_data.staging import stage


def resolve_data(data: DataConfig, *, is_main: bool, local_rank: int,
                 broadcast: Callable[[Any], Any]) -> DataConfig:
    """`data`, with data.root replaced by its staged copy (data.cache_dir: one copy per node) or filled in
    with the demo dataset (generated once by the main rank, then cached). `broadcast(obj)`: the main rank's
    obj on every rank (also a barrier)."""
    if data.cache_dir and data.root and data.loader != "synthetic":
        return replace(data, root=str(stage(data.root, data.cache_dir, verbose=local_rank == 0)))
    if data.loader == "synthetic" or data.root or data.train_list:  # validate() made sure one is set
        return data
    if data.loader == "dali" and importlib.util.find_spec("nvidia.dali") is None:
        # The demo must run on a fresh machine: without DALI (an optional extra) it reads through torch.
        if is_main:
            print("demo: DALI is not installed (pip install -e '.[dali]'); reading with data.loader=torch")
        data = replace(data, loader="torch")
    root = str(ensure_demo_dataset()) if is_main else None
    return replace(data, root=broadcast(root))  # also a barrier: the others wait for the files
