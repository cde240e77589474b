"""The fine-tuning presets compose against the schema with the values their comments promise."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gcvit import list_models
from gcvit.config import Config, from_hydra, register
from gcvit.models.gcvit import stage_window_sizes

CONF = Path(__file__).resolve().parents[1] / "conf"
register()


def _compose(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return from_hydra(compose(config_name="config", overrides=list(overrides)), list_models)


def test_finetune_recipe_is_gentle_and_short() -> None:
    cfg = _compose("experiment=finetune", "data.root=/data/flowers", "model.pretrained=/w/gcvit_tiny.pth")
    assert cfg.name == "finetune" and cfg.model.pretrained == "/w/gcvit_tiny.pth"
    assert cfg.optim.layer_decay == 0.9 and cfg.model.head_init_scale == 0.001
    # a tenth of the from-scratch peak lr at the same batch
    assert cfg.optim.lr / cfg.optim.lr_batch_size == pytest.approx(0.1 * 1e-3 / 1024)
    assert cfg.sched.epochs == 30 and cfg.sched.warmup_epochs == 3 and cfg.sched.cooldown_epochs == 0
    assert cfg.aug.mixup == 0 and cfg.aug.cutmix == 0 and cfg.aug.rand_augment is None  # light augmentation
    assert cfg.trainer.ema_decay == 0.999 and cfg.trainer.ema_warmup
    assert cfg.trainer.global_batch_size % cfg.data.batch_size == 0


@pytest.mark.parametrize(("px", "windows"), [(384, (12, 12, 24, 12)), (512, (16, 16, 32, 16))])
def test_high_resolution_recipes_have_the_official_geometry(px: int, windows: tuple[int, ...]) -> None:
    cfg = _compose(f"experiment=in1k_ft{px}_gcvit_large", "data.root=/data/imagenet")
    assert cfg.model.name == "gcvit_large" and cfg.model.img_size == px and cfg.model.drop_path_rate == 0.1
    assert stage_window_sizes(px) == windows  # gc_vit_large_{px}_21k's window_size in NVlabs/GCVit
    assert cfg.optim.lr == 1e-3 and cfg.sched.warmup_epochs == 20 and cfg.sched.min_lr == 5e-6
    assert cfg.trainer.ema_decay == 0.9998 and cfg.optim.clip_grad == 5.0
    text = (CONF / "experiment" / f"in1k_ft{px}_gcvit_large.yaml").read_text()
    assert "ours" in text and "NVlabs/GCVit" in text
