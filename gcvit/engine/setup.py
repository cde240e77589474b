"""Run set-up shared by training and evaluation: runtime flags, the run directory, the dataset root,
per-rank RNG state and per-step seeds, autocast."""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import random
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from gcvit.config import Config, to_container
from gcvit.engine import distributed, recipe
from gcvit.engine.distributed import DistEnv
from gcvit.engine.secrets import redact

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def configure_runtime(cfg: Config) -> None:
    """Threads and (optionally) deterministic kernels, before any model or data exists."""
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    if cfg.trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

def run_dir_for(cfg: Config) -> Path:
    """trainer.output_dir, else the sweep member's dir, else runs/<name>[-<SLURM job>]; restarts find it."""
    if cfg.trainer.output_dir:
        return Path(cfg.trainer.output_dir).expanduser().resolve()
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        # <sweep dir>/<member>: members never share checkpoints, and a requeued member finds its own again.
        return Path(HydraConfig.get().runtime.output_dir).resolve()
    array = os.environ.get("SLURM_ARRAY_JOB_ID")  # array tasks share it: add the task id
    job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ.get("SLURM_JOB_ID")
    return (Path("runs") / (f"{cfg.name}-{job}" if job else cfg.name)).resolve()

def trained_run_dir(cfg: Config) -> Path:
    """mode=eval without checkpoint=: the training run's dir, never one named after this (eval) job.

    trainer.output_dir, else whichever of runs/<name> and runs/<name>-<SLURM job id> holds checkpoints;
    several candidates (two SLURM trainings of one name) are a one-line error listing them.
    """
    if cfg.trainer.output_dir:
        return Path(cfg.trainer.output_dir).expanduser().resolve()
    runs = Path("runs")
    job_dir = re.compile(rf"{re.escape(cfg.name)}(-\d+(_\d+)?)?")
    found = sorted(d for d in runs.glob(f"{glob.escape(cfg.name)}*")
                   if job_dir.fullmatch(d.name) and any((d / "checkpoints").glob("*.pt")))
    if len(found) > 1:
        raise SystemExit(f"config error: checkpoint is not set and several runs are named {cfg.name}: "
                         f"{', '.join(map(str, found))}; pass checkpoint=PATH or trainer.output_dir=RUN_DIR")
    return (found[0] if found else runs / cfg.name).resolve()

def prepare_run_dir(cfg: Config, env: DistEnv) -> Path:
    """Rank 0 picks and creates the run dir, checks or records its recipe and writes .hydra/ there; every
    rank gets the same path, or the same one-line refusal."""
    run_dir = Path(distributed.broadcast_object(str(run_dir_for(cfg))))
    problem = _write_run_dir(cfg, run_dir) if env.is_main else None
    problem = distributed.broadcast_object(problem)
    if problem:
        raise SystemExit(problem)
    return run_dir

def _write_run_dir(cfg: Config, run_dir: Path) -> str | None:
    config = redact(to_container(cfg))
    hydra_dir = run_dir / ".hydra"
    try:
        hydra_dir.mkdir(parents=True, exist_ok=True)
        refusal = recipe.guard(run_dir, config, cfg.trainer.resume)
        if refusal:  # .hydra/ keeps describing the run that is there
            return refusal
        (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))
    except OSError as e:
        return (f"config error: cannot write the run directory {run_dir} ({e.strerror}); set "
                "trainer.output_dir to a writable directory")
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():  # unset when the loop runs outside @hydra.main (tests, notebooks)
        overrides = list(HydraConfig.get().overrides.task)
        (hydra_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(redact(overrides)))
    return None

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

def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed python/numpy/torch for one optimizer step from (seed, rank, step).

    Loader iterators and evaluation draw from the global generators at points that differ between an
    uninterrupted and a resumed run; reseeding every step keeps Mixup, erasing and drop path identical.
    """
    s = int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)  # every CUDA device too

def rng_state() -> dict[str, Any]:
    """This rank's generator states as tensors and plain types (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state

def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of rng_state()."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast, or nothing for fp32."""
    dtype = _DTYPES[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)
