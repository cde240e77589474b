"""The dataset a run reads: data.root as configured, staged on the node, or the demo generated once."""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path
from typing import Any

from gcvit.config import Config
from gcvit.engine import distributed
from gcvit.engine.distributed import DistEnv


def _staged(root: str, cache_dir: str, env: DistEnv) -> Path:
    """data.cache_dir: the node-local copy of the pack at data.root (gcvit_data.staging: one per node)."""
    from gcvit_data.shards import is_pack
    from gcvit_data.staging import stage

    if not is_pack(root):
        raise SystemExit(f"config error: data.cache_dir={cache_dir} stages packs only, and data.root={root} "
                         "is an image folder; pack it (python -m gcvit_data.pack ROOT OUT) or unset "
                         "data.cache_dir")
    return stage(root, cache_dir, verbose=env.local_rank == 0)


def resolve_data(cfg: Config, env: DistEnv) -> Any:
    """cfg.data, with the demo dataset's root filled in (generated once by rank 0, then cached)."""
    data = cfg.data
    if data.cache_dir and data.root and data.loader != "synthetic":
        return replace(data, root=str(_staged(data.root, data.cache_dir, env)))
    if data.loader == "synthetic" or data.root or data.train_list:  # validate() made sure one is set
        return data
    if data.loader == "dali" and importlib.util.find_spec("nvidia.dali") is None:
        # The demo must run on a fresh machine: without DALI (an optional extra) it reads through torch.
        if env.is_main:
            print("demo: DALI is not installed (pip install -e '.[dali]'); reading with data.loader=torch")
        data = replace(data, loader="torch")
    from gcvit_data.demo import ensure_demo_dataset

    root = str(ensure_demo_dataset()) if env.is_main else None
    return replace(data, root=distributed.broadcast_object(root))  # also a barrier: others wait for the files
