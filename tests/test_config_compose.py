"""Hydra composition of every preset against the typed schema, and the one-line start-up errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gcvit import list_models
from gcvit.config import Config, from_hydra, register

CONF = Path(__file__).resolve().parents[1] / "conf"
register()


def _compose(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return from_hydra(compose(config_name="config", overrides=list(overrides)), list_models)


def test_default_job_is_the_cpu_demo() -> None:
    cfg = _compose()
    assert cfg.name == "demo" and cfg.mode == "train"
    assert cfg.trainer.device == "cpu" and cfg.data.root is None
    assert cfg.model.name in list_models()


@pytest.mark.parametrize("exp", sorted(p.stem for p in (CONF / "experiment").glob("in1k_*.yaml")))
def test_every_paper_recipe_composes(exp: str) -> None:
    cfg = _compose(f"experiment={exp}", "data.root=/data/imagenet")
    assert cfg.name == exp and cfg.model.name == exp.removeprefix("in1k_")
    assert cfg.sched.epochs == 300 and cfg.sched.warmup_epochs == 20 and cfg.sched.cooldown_epochs == 10
    assert cfg.optim.lr == 1e-3 and cfg.optim.lr_batch_size == 1024 and cfg.optim.weight_decay == 0.05
    assert cfg.optim.clip_grad == 5.0 and cfg.trainer.ema_decay == 0.9998 and cfg.trainer.precision == "bf16"
    assert cfg.aug.label_smoothing == 0.1 and cfg.aug.mixup > 0 and cfg.aug.cutmix > 0
    assert cfg.model.drop_path_rate is not None and cfg.model.drop_path_rate > 0
    assert cfg.trainer.compile is None  # compiled on CUDA, eager on CPU (gcvit.engine.loop.compiled)


def test_every_model_file_names_a_registered_model() -> None:
    for f in (CONF / "model").glob("*.yaml"):
        assert _compose(f"model={f.stem}", "data=synthetic").model.name in list_models()


def test_compile_follows_the_device_unless_set() -> None:
    from gcvit.engine.distributed import DistEnv
    from gcvit.engine.loop import compiled

    def on(kind: str, *overrides: str) -> bool:
        return compiled(_compose(*overrides), DistEnv(0, 1, 0, torch.device(kind)))

    recipe = ("experiment=in1k_gcvit_tiny", "data.root=/data/imagenet")
    assert on("cuda", *recipe) and not on("cpu", *recipe)
    assert not on("cuda", *recipe, "trainer.compile=false") and on("cpu", *recipe, "trainer.compile=true")
    assert not on("cuda") and not on("cuda", "debug=tiny")  # the demo and the smoke test stay eager


def test_debug_tiny_and_overrides() -> None:
    cfg = _compose("debug=tiny", "optim.lr=0.01", "trainer.max_steps=3")
    assert cfg.name == "debug-tiny" and cfg.optim.lr == 0.01 and cfg.trainer.max_steps == 3
    assert cfg.model.img_size <= 64 and cfg.trainer.precision == "fp32"


@pytest.mark.parametrize("override,key,allowed", [
    ("model.name=gcvit_huge", "model.name", "gcvit_tiny"),
    ("optim.lr=-1", "optim.lr", "a positive float"),
    ("trainer.global_batch_size=100", "trainer.global_batch_size", "multiple of data.batch_size"),
    ("trainer.precision=fp8", "trainer.precision", "fp32 | bf16 | fp16"),
    ("logger.wandb.mode=maybe", "logger.wandb.mode", "online | offline | disabled"),
    ("optim.impl=cuda", "optim.impl", "torch | apex"),
    ("mode=predict", "mode", "train | eval"),
    ("experiment=in1k_gcvit_tiny", "data.root", "ROOT/train/<wnid>"),
    ("data.loader=pil", "data.loader", "dali | torch | synthetic"),
])
def test_invalid_values_fail_with_one_line(override: str, key: str, allowed: str) -> None:
    with pytest.raises(SystemExit) as err:
        _compose(override)
    msg = str(err.value)
    assert msg.startswith(f"config error: {key}=") and allowed in msg and "\n" not in msg


def test_mistyped_value_is_rejected_at_compose() -> None:
    with pytest.raises(Exception, match="optim.lr"):
        _compose("optim.lr=fast")
