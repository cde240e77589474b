"""The run directory: where a run (or its evaluation) lives, created by rank 0 with its recipe and .hydra/."""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from omegaconf import OmegaConf

from gcvit.config import Config, to_container
from gcvit.engine import distributed, recipe
from gcvit.engine.distributed import DistEnv
from gcvit.engine.secrets import redact


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
