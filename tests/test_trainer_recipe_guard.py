"""The resume guard (a run directory keeps the recipe it was started with) and eval's choice of the training
run directory when no checkpoint is named."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gcvit.config import Config, to_container
from gcvit.engine.recipe import RECIPE_FILE, differences, guard, may_change
from gcvit.engine.run_dir import trained_run_dir

REPO = Path(__file__).resolve().parents[1]


def _config(**changes: object) -> dict:
    """A resolved config dict with dotted `changes` applied."""
    cfg = OmegaConf.structured(Config)
    cfg.name = "run"
    for key, value in changes.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return to_container(OmegaConf.to_object(cfg))  # type: ignore[arg-type]


def test_first_start_records_the_recipe_and_the_same_restart_passes(tmp_path: Path) -> None:
    assert guard(tmp_path, _config(), "auto") is None
    assert OmegaConf.load(tmp_path / RECIPE_FILE).optim.lr == 1e-3
    assert guard(tmp_path, _config(), "auto") is None


def test_a_changed_recipe_is_refused_in_one_line_naming_keys_and_ways_on(tmp_path: Path) -> None:
    guard(tmp_path, _config(), "auto")
    msg = guard(tmp_path, _config(optim__lr=0.01, sched__epochs=4), "auto")
    assert msg is not None and "\n" not in msg and msg.startswith("config error: ")
    assert "optim.lr=0.001 (now 0.01), sched.epochs=300 (now 4)" in msg
    assert "trainer.output_dir=" in msg and "name=" in msg and "trainer.resume=force" in msg
    assert OmegaConf.load(tmp_path / RECIPE_FILE).optim.lr == 1e-3  # the record is untouched


def test_many_differences_name_the_first_three(tmp_path: Path) -> None:
    guard(tmp_path, _config(), "auto")
    msg = guard(tmp_path, _config(optim__lr=0.01, optim__weight_decay=0.1, sched__epochs=4, trainer__seed=1,
                                  aug__mixup=0.0), "auto")
    assert msg is not None and "and 2 more" in msg and "trainer.seed" not in msg


@pytest.mark.parametrize("key,value", [
    ("trainer.max_steps", 10), ("trainer.output_dir", "/elsewhere"), ("logger.wandb.mode", "offline"),
    ("data.batch_size", 64), ("data.root", "/scratch/imagenet"), ("trainer.ckpt_every_steps", 5),
    ("data.feeder_workers", 6), ("data.hw_decoder_load", 0.9),
])
def test_keys_that_may_change_on_resume(tmp_path: Path, key: str, value: object) -> None:
    guard(tmp_path, _config(), "auto")
    assert may_change(key)
    assert guard(tmp_path, _config(**{key.replace(".", "__"): value}), "auto") is None


@pytest.mark.parametrize("key", ["model.name", "model.overrides", "data.demo", "aug.mixup", "optim.lr",
                                 "sched.epochs", "trainer.global_batch_size", "trainer.seed",
                                 "trainer.precision", "trainer.ema_decay", "checkpoint"])
def test_recipe_keys_may_not_change(key: str) -> None:
    assert not may_change(key)


def test_force_continues_and_keeps_the_old_record(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    guard(tmp_path, _config(), "auto")
    assert guard(tmp_path, _config(sched__cooldown_epochs=20), "force") is None
    assert "continuing" in capsys.readouterr().out
    assert OmegaConf.load(tmp_path / RECIPE_FILE).sched.cooldown_epochs == 20
    (old,) = tmp_path.glob("recipe.*.yaml")
    assert OmegaConf.load(old).sched.cooldown_epochs == 10


def test_keys_of_another_schema_version_are_not_differences() -> None:
    old, new = _config(), _config()
    del old["trainer"]["ema_warmup"]
    assert differences(old, new) == []


def test_eval_finds_the_training_run_not_a_new_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "999")  # the eval job's own id must play no part
    cfg = OmegaConf.to_object(OmegaConf.structured(Config(name="exp")))
    assert trained_run_dir(cfg) == (tmp_path / "runs" / "exp").resolve()  # nothing trained yet
    for d in ("exp-1234", "exp-extra", "exp"):
        (tmp_path / "runs" / d / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "exp-1234" / "checkpoints" / "last.pt").touch()
    (tmp_path / "runs" / "exp-extra" / "checkpoints" / "last.pt").touch()  # another name, not a job id
    assert trained_run_dir(cfg) == (tmp_path / "runs" / "exp-1234").resolve()
    (tmp_path / "runs" / "exp" / "checkpoints" / "last.pt").touch()
    with pytest.raises(SystemExit, match="several runs are named exp: .*trainer.output_dir=RUN_DIR"):
        trained_run_dir(cfg)
    cfg.trainer.output_dir = str(tmp_path / "mine")
    assert trained_run_dir(cfg) == tmp_path / "mine"


@pytest.mark.slow
def test_train_py_refuses_a_changed_recipe_and_resumes_with_force(tmp_path: Path) -> None:
    """The issue's case: the same run dir restarted with another lr and schedule."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, str(REPO / "train.py"), "debug=tiny", f"trainer.output_dir={tmp_path}",
            "trainer.max_steps=2", "trainer.eval_every_epochs=100"]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *extra], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)

    first = run()
    assert first.returncode == 0, first.stderr[-3000:]
    refused = run("optim.lr=0.01", "sched.cooldown_epochs=1")
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        f"config error: {tmp_path} holds a run with another recipe: optim.lr=0.002 (now 0.01), "
        "sched.cooldown_epochs=0 (now 1); start a new run with trainer.output_dir=DIR (or name=NAME), or "
        "continue this one with the new values with trainer.resume=force"]
    forced = run("sched.cooldown_epochs=1", "trainer.max_steps=3", "trainer.resume=force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "continuing" in forced.stdout and "at step 2" in forced.stdout
    assert OmegaConf.load(tmp_path / RECIPE_FILE).sched.cooldown_epochs == 1
