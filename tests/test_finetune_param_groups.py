"""optim.layer_decay: each parameter's lr scale and weight decay against a hand-computed table; the schedule
applies the scales; group_matcher speaks timm's grouping."""
from __future__ import annotations

import pytest
import torch
from timm.models import group_parameters

import gcvit
from gcvit.engine import optim, param_groups

# depths (1, 2, 3, 1): stage 0 and 3 have one block and no global query generator
SMALL = dict(dim=16, depths=(1, 2, 3, 1), num_heads=(1, 1, 2, 2), img_size=32, window_size=(4, 4, 2, 1),
             mlp_ratio=2.0, num_classes=5)
# Layer of every parameter, by name prefix, worked out by hand: the stem is layer 0, then one layer per block
# in depth order; a stage's query generator goes with its first block, the downsampler at the start of stage
# s with the last block of stage s-1 (the stage it ends in the official layout); norm and head are last.
LAYERS = [("stem.", 0), ("stem_reduce.", 0), ("stages.0.blocks.0.", 1), ("stages.1.downsample.", 1),
          ("stages.1.global_query.", 2), ("stages.1.blocks.0.", 2), ("stages.1.blocks.1.", 3),
          ("stages.2.downsample.", 3), ("stages.2.global_query.", 4), ("stages.2.blocks.0.", 4),
          ("stages.2.blocks.1.", 5), ("stages.2.blocks.2.", 6), ("stages.3.downsample.", 6),
          ("stages.3.blocks.0.", 7), ("norm.", 8), ("head.", 8)]


def _layer(name: str) -> int:
    (layer,) = [lay for prefix, lay in LAYERS if name.startswith(prefix)]
    return layer


def _small() -> torch.nn.Module:
    return gcvit.create_model("gcvit_xxtiny", **SMALL)


def _per_param(opt: torch.optim.Optimizer, model: torch.nn.Module, key: str) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g[key] for g in opt.param_groups for p in g["params"]}


def test_layer_decay_scales_match_the_hand_table_and_keep_the_no_decay_set() -> None:
    model = _small()
    opt = optim.build_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8, impl="torch",
                                device=torch.device("cpu"), layer_decay=0.75)
    scales = _per_param(opt, model, "lr_scale")
    decays = _per_param(opt, model, "weight_decay")
    names = [n for n, _ in model.named_parameters()]
    assert sorted(scales) == sorted(names)  # every parameter exactly once
    for name in names:
        assert scales[name] == pytest.approx(0.75 ** (8 - _layer(name))), name
    undecayed = model.no_weight_decay()
    assert {n for n, d in decays.items() if d == 0.0} == undecayed
    assert {n for n, d in decays.items() if d == 0.05} == set(names) - undecayed
    assert "stages.1.blocks.0.attn.relative_position_bias_table" in undecayed  # 2-d, named by the model

    sched = optim.WarmupCosine(base_lr=2e-3, total_steps=10)
    base = sched.apply(opt)
    lrs = _per_param(opt, model, "lr")
    assert base == 2e-3 and lrs["head.weight"] == base and lrs["norm.weight"] == base
    assert lrs["stem.weight"] == pytest.approx(base * 0.75 ** 8)
    assert lrs["stages.2.downsample.reduction.weight"] == pytest.approx(base * 0.75 ** 5)


def test_without_layer_decay_the_two_plain_groups_stay() -> None:
    model = _small()
    opt = optim.build_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8, impl="torch",
                                device=torch.device("cpu"))
    assert len(opt.param_groups) == 2 and all("lr_scale" not in g for g in opt.param_groups)


def test_group_matcher_groups_for_timm_fine_and_coarse() -> None:
    model = _small()
    fine = group_parameters(model, model.group_matcher(), reverse=True)
    assert fine == {n: _layer(n) for n, _ in model.named_parameters()}
    coarse = group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    # stem 0, stage i (with the downsampler that ends it) i + 1, norm and head last
    assert coarse["stem_reduce.conv.conv_dw.weight"] == 0
    assert coarse["stages.0.blocks.0.mlp.fc1.weight"] == coarse["stages.1.downsample.norm1.weight"] == 1
    assert coarse["stages.1.global_query.convs.0.conv_pw.weight"] == 2
    assert coarse["stages.2.downsample.norm2.bias"] == 2
    assert coarse["stages.3.blocks.0.norm1.weight"] == 4
    assert coarse["head.weight"] == coarse["norm.weight"] == 5


def test_bad_layer_decay_is_one_line() -> None:
    from gcvit.config import Config, validate

    cfg = Config()
    cfg.optim.layer_decay = 1.5
    with pytest.raises(SystemExit, match=r"^config error: optim.layer_decay=1.5 is invalid; allowed: null or "
                                         r"a float in \(0, 1\]$"):
        validate(cfg, gcvit.list_models)


@pytest.mark.parametrize(("what", "prefixes"), [
    ("stem", ("stem.", "stem_reduce.")),
    ("stage1", ("stem.", "stem_reduce.", "stages.0.", "stages.1.downsample.")),
    ("stage3", ("stem.", "stem_reduce.", "stages.0.", "stages.1.", "stages.2.", "stages.3.downsample.")),
    ("stage4", ("stem.", "stem_reduce.", "stages.")),
    ("backbone", ("stem.", "stem_reduce.", "stages.", "norm.")),
])
def test_freeze_takes_a_prefix_out_of_every_optimizer(what: str, prefixes: tuple[str, ...]) -> None:
    model = gcvit.create_model("gcvit_xxtiny", **{**SMALL, "drop_path_rate": 0.3})
    line = param_groups.freeze(model, what)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    assert line.startswith(f"frozen ({what}): ") and "\n" not in line
    for layer_decay in (None, 0.75):
        opt = optim.build_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8,
                                    impl="torch", device=torch.device("cpu"), layer_decay=layer_decay)
        trained = set(_per_param(opt, model, "weight_decay"))
        assert trained == {n for n, _ in model.named_parameters()} - frozen
    for i, stage in enumerate(model.stages):  # stochastic depth only where blocks learn
        off = what == "backbone" or (what != "stem" and i < int(what[-1]))
        assert all((b.drop_path == 0.0) == off for b in stage.blocks[1:]), (what, i)


def test_bad_freeze_is_one_line() -> None:
    from gcvit.config import Config, validate

    cfg = Config()
    cfg.model.freeze = "stage5"
    with pytest.raises(SystemExit, match=r"^config error: model.freeze='stage5' is invalid; allowed: null \| "
                                         r"stem \| stage1 \| stage2 \| stage3 \| stage4 \| backbone$"):
        validate(cfg, gcvit.list_models)


def test_layer_decay_line_counts_the_layers() -> None:
    assert param_groups.describe_layer_decay(_small(), 0.5) == (
        "layer decay 0.5: 9 layers (stem, each block, head); lr x 0.00391 at the stem rising to x 1 at the "
        "head")
