"""Each default is written once: no preset file in conf/ restates a schema default (gcvit/config.py,
data/config.py) or a variant's published value (gcvit/variants.py); a preset holds only what it changes."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from gcvit.config import Config
from gcvit.engine.recipe import flatten
from gcvit.variants import VARIANTS

CONF = Path(__file__).resolve().parents[1] / "conf"
GLOBAL_GROUPS = ("experiment", "debug")  # `# @package _global_`: their keys start at the root
PRESETS = sorted(p for p in CONF.glob("*/*.yaml") if p.parent.name != "hydra")


def restated(path: Path) -> dict[str, Any]:
    """Key -> value of every line of a preset that repeats the schema default or the variant's value."""
    node = OmegaConf.to_container(OmegaConf.load(path))
    group, option = path.parent.name, path.stem
    entries = [next(iter(e.items())) for e in node.pop("defaults", [])]
    choices = {k.removeprefix("override /"): v for k, v in entries}
    values = flatten(node, "" if group in GLOBAL_GROUPS else f"{group}.")
    if group == "model":  # a model file's name is the option itself (model=X builds X), not a default
        assert values.pop("model.name", option) == option, f"{path}: model.name must be {option}"
    model = values.get("model.name", option if group == "model" else choices.get("model"))
    variant = VARIANTS.get(model, {})
    known = flatten(asdict(Config()))
    known["model.drop_path_rate"] = variant.get("drop_path")
    known.update({f"model.overrides.{k}": v for k, v in variant.items()})
    overrides = values.pop("model.overrides", None)  # compared key by key with the variant's shape
    values.update({f"model.overrides.{k}": v for k, v in (overrides or {}).items()})
    if overrides == {}:
        values["model.overrides"] = overrides
    return {k: v for k, v in values.items() if k in known and _same(v, known[k])}


def _same(value: Any, default: Any) -> bool:
    if isinstance(default, tuple):  # the variant registry writes tuples, YAML lists
        default = list(default)
    return value == default and isinstance(value, bool) == isinstance(default, bool)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_no_preset_restates_a_default(path: Path) -> None:
    assert restated(path) == {}, (f"{path.relative_to(CONF.parent)} repeats the schema's or the variant's "
                                  "values: delete those lines (the dataclasses of gcvit/config.py and "
                                  "data/config.py, and gcvit/variants.py, are their one source)")


def test_the_check_finds_restated_values(tmp_path: Path) -> None:
    """The guard itself: a schema default, a variant's drop path and a variant's shape are all caught."""
    (tmp_path / "trainer").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "experiment").mkdir()
    (tmp_path / "trainer" / "mine.yaml").write_text("seed: 0\nprecision: fp32\n")
    (tmp_path / "model/gcvit_base.yaml").write_text("name: gcvit_base\ndrop_path_rate: 0.5\nimg_size: 9\n")
    (tmp_path / "experiment" / "x.yaml").write_text(
        "defaults:\n  - override /model: gcvit_small\nmodel:\n  drop_path_rate: 0.3\n"
        "  overrides: {dim: 96, depths: [3, 4, 19, 5], mlp_ratio: 3.0}\noptim:\n  lr: 1.0e-3\n")
    assert restated(tmp_path / "trainer" / "mine.yaml") == {"trainer.seed": 0}
    assert restated(tmp_path / "model" / "gcvit_base.yaml") == {"model.drop_path_rate": 0.5}
    assert restated(tmp_path / "experiment" / "x.yaml") == {
        "model.drop_path_rate": 0.3, "model.overrides.dim": 96, "model.overrides.depths": [3, 4, 19, 5],
        "optim.lr": 1e-3}
