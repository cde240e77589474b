"""The recipe a run directory was started with (RUN_DIR/recipe.yaml), and the resume guard.

A run directory is found again by its name, so a restart with another learning rate or schedule would
otherwise continue (or report as finished) a run trained with different values. The recipe is every
config key except the few listed in MAY_CHANGE_ON_RESUME: where the run is stored, how long it goes on,
how it is logged, and how the same samples are read on other hardware.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

RECIPE_FILE = "recipe.yaml"
# Keys (and key prefixes) a restart may change without trainer.resume=force; docs/training.md lists why.
MAY_CHANGE_ON_RESUME = (
    "name", "mode", "trainer.output_dir", "trainer.resume", "trainer.max_steps", "trainer.device",
    "trainer.compile", "trainer.threads", "trainer.deterministic", "trainer.audit",
    "trainer.ckpt_every_steps", "trainer.keep_checkpoints", "trainer.log_every_steps",
    "trainer.eval_every_epochs", "trainer.nonfinite_policy", "trainer.nonfinite_max_consecutive",
    "trainer.stall_timeout", "trainer.stall_grace", "trainer.straggler_ratio", "trainer.straggler_windows",
    "data.root", "data.cache_dir", "data.index_cache", "data.index_dir", "data.loader", "data.dali_device",
    "data.batch_size", "data.workers", "data.prefetch", "data.feeder_workers", "data.hw_decoder_load",
    "logger",
)
_SHOWN = 3  # differing keys named in the error line


def may_change(key: str) -> bool:
    """Whether a restart may change `key` (dotted) and still resume without trainer.resume=force."""
    return any(key == k or key.startswith(f"{k}.") for k in MAY_CHANGE_ON_RESUME)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf value of a nested config dict (lists and model.overrides stay whole)."""
    if not isinstance(node, dict) or prefix == "model.overrides.":
        return {prefix[:-1]: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def recipe_of(config: dict[str, Any]) -> dict[str, Any]:
    """The keys of a resolved config that define what a run trains."""
    return {k: v for k, v in flatten(config).items() if not may_change(k)}


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key=old (now new)` for every recipe key whose value changed, in config order.

    Keys one side lacks (a newer or older schema) are not differences: an upgrade must not strand a run.
    """
    old, new = recipe_of(recorded), recipe_of(current)
    return [f"{k}={_show(old[k])} (now {_show(v)})" for k, v in new.items() if k in old and old[k] != v]


def _show(value: Any) -> str:
    return "null" if value is None else str(value).replace(" ", "")


def guard(run_dir: Path, config: dict[str, Any], resume: str) -> str | None:
    """Record the recipe of a new run dir, or check a restart against it.

    Returns None when the run may go on (and records the recipe), or the one-line refusal. With
    resume=force a changed recipe is accepted: the old record is kept as recipe.<time>.yaml.
    """
    path = run_dir / RECIPE_FILE
    if path.is_file():
        recorded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        diff = differences(recorded, config)  # type: ignore[arg-type]
        if not diff:
            return None
        if resume != "force":
            more = f" and {len(diff) - _SHOWN} more" if len(diff) > _SHOWN else ""
            return (f"config error: {run_dir} holds a run with another recipe: "
                    f"{', '.join(diff[:_SHOWN])}{more}; start a new run with trainer.output_dir=DIR (or "
                    "name=NAME), or continue this one with the new values with trainer.resume=force")
        path.rename(run_dir / f"recipe.{time.strftime('%Y%m%dT%H%M%S')}.yaml")
        print(f"trainer.resume=force: continuing {run_dir} with {', '.join(diff)}", flush=True)
    path.write_text(OmegaConf.to_yaml(config))
    return None
