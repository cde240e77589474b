"""Hydra composition of every preset against the typed schema, the demo as the default of an empty choice
(never leaking into a run that names its model or data), and the one-line start-up errors."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gcvit import list_models
from gcvit.config import DEMO_DEFAULT, Config, from_hydra, register, with_demo_default
from gcvit.variants import VARIANTS

CONF = Path(__file__).resolve().parents[1] / "conf"
register()


def _compose(*overrides: str) -> Config:
    """What `python train.py OVERRIDES` trains (train.py applies with_demo_default to its arguments)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return from_hydra(compose(config_name="config", overrides=with_demo_default(list(overrides))),
                          list_models)


def _flat(cfg: Config) -> dict[str, object]:
    out: dict[str, object] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict) and prefix != "model.overrides.":
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(asdict(cfg), "")
    return out


def test_default_job_is_the_cpu_demo() -> None:
    cfg = _compose()
    assert cfg.name == "demo" and cfg.mode == "train"
    assert cfg.trainer.device == "cpu" and cfg.data.root is None and cfg.data.demo
    assert cfg.model.img_size == 64 and cfg.model.overrides["dim"] == 32


def test_demo_tweaks_keep_the_demo() -> None:
    cfg = _compose("optim.lr=0.01", "trainer.output_dir=/tmp/demo-run")
    assert cfg.name == "demo" and cfg.optim.lr == 0.01 and cfg.model.img_size == 64


@pytest.mark.parametrize("args,model", [
    (("model=gcvit_tiny", "data=imagenet", "data.root=/data/imagenet", "mode=eval", "checkpoint=c.pth"),
     "gcvit_tiny"),
    (("model=gcvit_small", "data=synthetic"), "gcvit_small"),
    (("data.root=/data/imagenet",), "gcvit_tiny"),
    (("model.name=gcvit_tiny", "data.root=/data/imagenet"), "gcvit_tiny"),
    (("experiment=in1k_gcvit_tiny", "data.root=/data/imagenet"), "gcvit_tiny"),
])
def test_naming_a_model_or_data_starts_from_the_paper_recipe(args: tuple[str, ...], model: str) -> None:
    """No demo pin leaks: every key not named on the command line has the paper recipe's value."""
    cfg, paper = _flat(_compose(*args)), _flat(_compose(f"model={model}", "data.root=/data/imagenet"))
    named = {a.split("=")[0] for a in args} | {"name", "data.root"}
    if "experiment" in named:  # the in1k_* presets also compile on CUDA (trainer.compile=auto)
        named.add("trainer.compile")
    leaked = {k: v for k, v in cfg.items() if v != paper[k] and not any(k.startswith(n) for n in named)}
    assert leaked == {}
    assert cfg["model.img_size"] == 224 and cfg["model.overrides"] == {} and cfg["trainer.device"] == "auto"
    assert cfg["trainer.precision"] == "bf16" and cfg["sched.epochs"] == 300 and cfg["model.name"] == model


def test_a_run_without_experiment_is_named_after_its_model() -> None:
    assert _compose("model=gcvit_small", "data=synthetic").name == "gcvit_small"


@pytest.mark.parametrize("args,expected", [
    ([], [DEMO_DEFAULT]),
    (["--cfg", "job"], ["--cfg", "job", DEMO_DEFAULT]),
    (["-m", "optim.lr=1,2"], ["-m", DEMO_DEFAULT, "optim.lr=1,2"]),
    (["+experiment=in1k_gcvit_tiny"], ["+experiment=in1k_gcvit_tiny"]),
    (["debug=tiny", "--cfg", "job"], ["debug=tiny", "--cfg", "job"]),
    (["--config-name=other"], ["--config-name=other"]),
])
def test_demo_default_is_added_only_to_an_empty_choice(args: list[str], expected: list[str]) -> None:
    assert with_demo_default(args) == expected


@pytest.mark.parametrize("exp", sorted(p.stem for p in (CONF / "experiment").glob("in1k_gcvit_*.yaml")))
def test_every_paper_recipe_composes(exp: str) -> None:
    cfg = _compose(f"experiment={exp}", "data.root=/data/imagenet")
    assert cfg.name == exp and cfg.model.name == exp.removeprefix("in1k_")
    assert cfg.sched.epochs == 300 and cfg.sched.warmup_epochs == 20 and cfg.sched.cooldown_epochs == 10
    assert cfg.optim.lr == 1e-3 and cfg.optim.lr_batch_size == 1024 and cfg.optim.weight_decay == 0.05
    assert cfg.optim.clip_grad == 5.0 and cfg.trainer.ema_decay == 0.9998 and cfg.trainer.precision == "bf16"
    assert cfg.aug.label_smoothing == 0.1 and cfg.aug.mixup > 0 and cfg.aug.cutmix > 0
    assert cfg.model.drop_path_rate is not None and cfg.model.drop_path_rate > 0
    assert cfg.model.img_size == 224 and cfg.model.overrides == {} and cfg.trainer.device == "auto"
    assert cfg.trainer.compile == "auto"  # block by block on CUDA, eager on CPU (gcvit.engine.compile.how)


def test_every_model_file_names_a_registered_model() -> None:
    for f in (CONF / "model").glob("*.yaml"):
        assert _compose(f"model={f.stem}", "data=synthetic").model.name in list_models()


def test_drop_path_is_the_variants_unless_set() -> None:
    """conf/model/*.yaml only name the model: its drop path comes from gcvit/variants.py (from_hydra)."""
    for name in list_models():
        assert _compose(f"model={name}", "data=synthetic").model.drop_path_rate == VARIANTS[name]["drop_path"]
    assert _compose("model.name=gcvit_base", "data=synthetic").model.drop_path_rate == 0.5  # not tiny's file
    assert _compose("model=gcvit_base", "data=synthetic", "model.drop_path_rate=0").model.drop_path_rate == 0


def test_compile_follows_the_device_unless_set() -> None:
    from gcvit.engine.compile import compiles, how
    from gcvit.engine.distributed import DistEnv

    def on(kind: str, *overrides: str) -> str:
        return how(_compose(*overrides), DistEnv(0, 1, 0, torch.device(kind)))

    recipe = ("experiment=in1k_gcvit_tiny", "data.root=/data/imagenet")
    assert on("cuda", *recipe) == "model" and on("cpu", *recipe) == "off"
    assert on("cuda", *recipe, "trainer.compile=off") == "off"
    assert on("cpu", *recipe, "trainer.compile=model") == "model"
    assert on("cuda") == on("cuda", "debug=tiny") == "off"  # the demo and the smoke test stay eager
    graphs = ("trainer.compile_mode=reduce-overhead",)
    assert on("cuda", *recipe, *graphs) == "model"  # CUDA graphs: the whole model, one process
    one, two = (DistEnv(0, n, 0, torch.device("cuda")) for n in (1, 2))
    refused = r"^config error: trainer.compile_mode=reduce-overhead \(CUDA graphs\) runs with trainer.compile"
    blocks = _compose(*recipe, *graphs, "trainer.compile=blocks")
    for cfg, env in ((blocks, one), (_compose(*recipe, *graphs), two)):
        with pytest.raises(SystemExit, match=refused):
            how(cfg, env)
    # FlexAttention compiles on its own: its graphs go to the run's cache even with trainer.compile=off
    assert compiles(_compose("model.attention=flex", "trainer.compile=off"), two)
    assert not compiles(_compose("trainer.compile=off"), two)


def test_debug_tiny_and_overrides() -> None:
    cfg = _compose("debug=tiny", "optim.lr=0.01", "trainer.max_steps=3")
    assert cfg.name == "debug-tiny" and cfg.optim.lr == 0.01 and cfg.trainer.max_steps == 3
    assert cfg.model.img_size <= 64 and cfg.trainer.precision == "fp32" and cfg.data.demo


@pytest.mark.parametrize("override,key,allowed", [
    ("model.name=gcvit_huge", "model.name", "gcvit_tiny"),
    ("optim.lr=-1", "optim.lr", "a positive float"),
    ("trainer.global_batch_size=100", "trainer.global_batch_size", "multiple of data.batch_size"),
    ("trainer.precision=fp8", "trainer.precision", "fp32 | bf16 | fp16"),
    ("logger.wandb.mode=maybe", "logger.wandb.mode", "online | offline | disabled"),
    ("optim.impl=cuda", "optim.impl", "torch | apex"),
    ("mode=predict", "mode", "train | eval"),
    ("experiment=in1k_gcvit_tiny", "data.root", "ROOT/train/<wnid>"),
    ("model=gcvit_tiny", "data.root", "ROOT/train/<wnid>"),
    ("data.loader=pil", "data.loader", "dali | torch | synthetic"),
    ("data.feeder_workers=-1", "data.feeder_workers", "an integer in [0, "),
    ("data.feeder_workers=100000", "data.feeder_workers", "DALI feeder processes per rank"),
    ("data.hw_decoder_load=1.5", "data.hw_decoder_load", "a fraction in [0, 1]"),
    ("trainer.resume=always", "trainer.resume", "auto | force"),
    ("trainer.stall_timeout=-1", "trainer.stall_timeout", "null (auto), 0 (off) or seconds in [5, 900]"),
    ("trainer.stall_timeout=86400", "trainer.stall_timeout", "collectives fail after 1800 s"),
    ("trainer.stall_grace=0", "trainer.stall_grace", "seconds in [5, 900]"),
    ("trainer.straggler_ratio=0.9", "trainer.straggler_ratio", "a finite float > 1"),
    ("trainer.straggler_ratio=inf", "trainer.straggler_ratio", "a finite float > 1"),
    ("trainer.straggler_windows=0", "trainer.straggler_windows", "an integer >= 1"),
    ("model.attention=flash", "model.attention", "auto | sdpa | flex | math"),
    ("model.norm=fp16", "model.norm", "auto | fp32 | fast"),
    ("trainer.compile=true", "trainer.compile", "off | model | blocks | auto"),
    ("trainer.compile_mode=max-autotune", "trainer.compile_mode", "max-autotune-no-cudagraphs"),
])
def test_invalid_values_fail_with_one_line(override: str, key: str, allowed: str) -> None:
    with pytest.raises(SystemExit) as err:
        _compose(override)
    msg = str(err.value)
    assert msg.startswith(f"config error: {key}=") and allowed in msg and "\n" not in msg


def test_mistyped_value_is_rejected_at_compose() -> None:
    with pytest.raises(Exception, match="optim.lr"):
        _compose("optim.lr=fast")
