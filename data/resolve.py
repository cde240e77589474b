"""The dataset a run reads: data.root as configured, its node-local copy (data.cache_dir), or the demo.

Called by every rank of training and mode=eval before the loaders are built. It knows the run only through
`cfg.data` and the rank's place (`env.is_main`, `env.local_rank`: gcvit.engine.distributed.DistEnv), so the
data package needs nothing from the trainer.
"""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from typing import Any

import torch.distributed as dist

from gcvit_data.config import DataConfig
from gcvit_data.demo import ensure_demo_dataset
from gcvit_data.staging import stage


def _from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank of the process group (also a barrier); `obj` itself without one."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_data(cfg: Any, env: Any) -> DataConfig:
    """cfg.data, with data.root replaced by its staged copy (data.cache_dir: one copy per node) or filled in
    with the demo dataset (generated once by rank 0, then cached)."""
    data = cfg.data
    if data.cache_dir and data.root and data.loader != "synthetic":
        return replace(data, root=str(stage(data.root, data.cache_dir, verbose=env.local_rank == 0)))
    if data.loader == "synthetic" or data.root or data.train_list:  # validate() made sure one is set
        return data
    if data.loader == "dali" and importlib.util.find_spec("nvidia.dali") is None:
        # The demo must run on a fresh machine: without DALI (an optional extra) it reads through torch.
        if env.is_main:
            print("demo: DALI is not installed (pip install -e '.[dali]'); reading with data.loader=torch")
        data = replace(data, loader="torch")
    root = str(ensure_demo_dataset()) if env.is_main else None
    return replace(data, root=_from_rank0(root))  # also a barrier: the others wait for the files
