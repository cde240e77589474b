"""Optimizer pieces: the per-step lr against timm's CosineLRScheduler, weight-decay groups, lr scaling,
accumulation arithmetic, and the apex error line."""
from __future__ import annotations

import sys

import pytest
import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from gcvit.engine import optim


@pytest.mark.parametrize("epochs,warmup,cooldown,spe", [(300, 20, 10, 7), (5, 1, 2, 13), (3, 0, 0, 4),
                                                        (4, 0.5, 1, 10)])
def test_lr_matches_timm_cosine_at_every_step(epochs: int, warmup: float, cooldown: int, spe: int) -> None:
    base, wlr, mlr = 4e-3, 1e-6, 5e-6
    ours, total = optim.build_schedule(base_lr=base, steps_per_epoch=spe, epochs=epochs, warmup_epochs=warmup,
                                       cooldown_epochs=cooldown, warmup_lr=wlr, min_lr=mlr)
    assert total == (epochs + cooldown) * spe
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    # timm configured as timm's create_scheduler_v2 does for per-step updates (step_on_epochs=False)
    ref = CosineLRScheduler(opt, t_initial=epochs * spe, lr_min=mlr, warmup_t=int(round(warmup * spe)),
                            warmup_lr_init=wlr, warmup_prefix=False, cycle_limit=1, t_in_epochs=False)
    ours_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    for step in range(total):
        ref.step_update(step)
        lr = ours.apply(ours_opt)
        assert lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), step
        assert ours_opt.param_groups[0]["lr"] == lr
        ours.step += 1
    if cooldown:
        assert ours.lr_at(total - 1) == pytest.approx(mlr)  # the cooldown sits at min lr


def test_schedule_state_resumes_position() -> None:
    a, _ = optim.build_schedule(base_lr=1.0, steps_per_epoch=10, epochs=3, warmup_epochs=1, cooldown_epochs=0,
                                warmup_lr=0.0, min_lr=0.0)
    a.step = 17
    b, _ = optim.build_schedule(base_lr=1.0, steps_per_epoch=10, epochs=3, warmup_epochs=1, cooldown_epochs=0,
                                warmup_lr=0.0, min_lr=0.0)
    b.load_state_dict(a.state_dict())
    assert b.step == 17 and b.lr_at(b.step) == a.lr_at(17)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.table = nn.Parameter(torch.zeros(3, 2))  # 2-d, excluded only because the model names it

    def no_weight_decay(self) -> set[str]:
        return {"table"}


def test_param_groups_exclude_norms_biases_and_named_tables() -> None:
    net = _Net()
    opt = optim.build_optimizer(net, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8, impl="torch")
    decay, plain = opt.param_groups
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(net.fc.weight)}
    assert {id(p) for p in plain["params"]} == {id(net.fc.bias), id(net.norm.weight), id(net.norm.bias),
                                                id(net.table)}
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]


def test_step_unless_skips_on_the_device_leaving_weights_moments_and_count() -> None:
    """The fused AdamW reads the verdict itself: a flagged step changes nothing, not even its step count."""
    net = _Net()
    opt = optim.build_optimizer(net, lr=1e-2, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8, impl="torch")

    def snapshot() -> list[torch.Tensor]:
        return [t.clone() for t in net.state_dict().values()] + [
            t.clone() for s in opt.state.values() for t in s.values()]

    for flag, changes in ((0.0, True), (1.0, False), (0.0, True)):
        (net.norm(net.fc(torch.randn(3, 4))).sum() + net.table.sum()).backward()
        if flag:  # what a bad step brings: NaN gradients, which must not reach weights or moments
            for q in net.parameters():
                q.grad.fill_(float("nan"))
        before = snapshot()
        optim.step_unless(opt, torch.tensor(flag))
        opt.zero_grad(set_to_none=True)
        after = snapshot()
        assert all(torch.isfinite(t).all() for t in after)
        same = len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
        assert same != changes, f"found_inf={flag}"
    assert all(int(s["step"]) == 2 for s in opt.state.values())


def test_lr_scaling_and_accumulation() -> None:
    assert optim.scaled_lr(1e-3, 1024, 4096) == pytest.approx(4e-3)
    assert optim.scaled_lr(1e-3, 1024, 256) == pytest.approx(2.5e-4)
    assert optim.accumulation_steps(1024, 128, 8) == 1
    assert optim.accumulation_steps(1024, 64, 4) == 4
    with pytest.raises(SystemExit, match=r"trainer.global_batch_size=1000 .* 128 x 4 = 512"):
        optim.accumulation_steps(1000, 128, 4)


@pytest.mark.parametrize("gpus", [16, 32, 48])
def test_the_recipe_on_16_or_more_gpus_stops_with_what_to_set(gpus: int) -> None:
    """1024 at 128 per GPU fills 8 GPUs; more cannot start, and the one line names the keys and values."""
    with pytest.raises(SystemExit) as err:
        optim.accumulation_steps(1024, 128, gpus)
    msg = str(err.value)
    assert "\n" not in msg and f"128 x {gpus} = {128 * gpus}" in msg
    assert f"set trainer.global_batch_size={128 * gpus}" in msg and "lr scales linearly" in msg
    assert "128 x 32 GPUs = 4096" in msg and "docs/gpu-training.md" in msg
    keeps = f"data.batch_size={1024 // gpus} to keep the global batch"
    assert (keeps in msg) == (1024 % gpus == 0)
    assert optim.accumulation_steps(128 * gpus, 128, gpus) == 1  # what the line says to set starts


def test_apex_missing_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "apex", None)  # import apex -> ImportError even where it is installed
    monkeypatch.setitem(sys.modules, "apex.optimizers", None)
    with pytest.raises(SystemExit) as err:
        optim.build_optimizer(_Net(), lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8, impl="apex")
    msg = str(err.value)
    assert "optim.impl=apex" in msg and "optim.impl=torch" in msg and "\n" not in msg
