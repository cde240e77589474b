"""NonFiniteGuard: skip/stop policies, one verdict for all ranks, weights never touched by NaN/Inf; the
verdict reaches the optimizer as a tensor (the trainer's fused AdamW), the host reads it in settle()."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gcvit.engine import faults
from gcvit.engine.faults import NAN_ENV as INJECT_ENV
from gcvit.engine.guard import NonFiniteError, NonFiniteGuard
from gcvit.engine.optim import step_unless


def _verdict(guard: NonFiniteGuard, loss: float, norm: float, stop: float = 0.0) -> tuple[bool, bool]:
    """One step's verdict read at once: (the step may be applied, a stop was requested on some rank)."""
    found_inf = guard.check(torch.tensor(loss), torch.tensor(norm), torch.tensor(stop))
    stopping = guard.settle()
    return not found_inf.item(), stopping


def _train(guard: NonFiniteGuard, steps: int) -> list[tuple[bool, dict, dict]]:
    """A real model/AdamW/clip loop in the trainer's order; per step: (stepped, weights, optimizer state)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    out, injected = [], faults.step_faults()
    for step in range(1, steps + 1):
        x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
        loss = nn.functional.cross_entropy(model(x), y)
        if injected is not None:
            loss = injected.on_loss(loss, step, 0)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        found_inf = guard.check(loss.detach(), norm)
        step_unless(opt, found_inf)  # the optimizer skips a bad step by itself
        opt.zero_grad(set_to_none=True)
        guard.settle()
        ok = not found_inf.item()
        out.append((ok, copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()["state"])))
    return out


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        _equal(a[k], b[k]) if isinstance(a[k], dict) else torch.equal(a[k], b[k]) for k in a)


def test_skip_policy_skips_injected_nan_and_never_updates_weights(monkeypatch, capfd) -> None:
    monkeypatch.setenv(INJECT_ENV, "3,4")
    guard = NonFiniteGuard(policy="skip")
    hist = _train(guard, 6)
    assert [ok for ok, _, _ in hist] == [True, True, False, False, True, True]
    for _, weights, opt_state in hist:
        assert all(torch.isfinite(t).all() for t in weights.values())
        assert all(torch.isfinite(t).all() for s in opt_state.values() for t in s.values())
    # Skipped steps leave weights and AdamW moments exactly as the last good step left them.
    assert _equal(hist[1][1], hist[3][1]) and _equal(hist[1][2], hist[3][2])
    assert not _equal(hist[3][1], hist[4][1])
    assert guard.state_dict() == {"steps": 6, "skipped": 2, "consecutive": 0}
    err = capfd.readouterr().err
    assert "skipped step 3: loss=nan" in err and "skipped step 4" in err


def test_stop_policy_names_step_and_value_after_k_in_a_row(monkeypatch) -> None:
    monkeypatch.setenv(INJECT_ENV, "2,4,5")
    guard = NonFiniteGuard(policy="stop", max_consecutive=2, verbose=False)
    expected = r"step 5: loss=nan .*2 bad step\(s\) in a row.*max_consecutive=2"
    with pytest.raises(NonFiniteError, match=expected):
        _train(guard, 6)
    assert guard.state_dict() == {"steps": 5, "skipped": 3, "consecutive": 2}


def test_state_dict_resumes_the_count_and_inf_grad_norm_is_caught() -> None:
    guard = NonFiniteGuard(policy="stop", max_consecutive=2, verbose=False)
    assert _verdict(guard, 1.0, math.inf) == (False, False)
    resumed = NonFiniteGuard(policy="stop", max_consecutive=2, verbose=False)
    resumed.load_state_dict(guard.state_dict())
    with pytest.raises(NonFiniteError, match="step 2: loss=1.0 grad_norm=inf"):
        _verdict(resumed, 1.0, math.inf)


def test_fp16_scaler_overflow_is_skipped_but_not_counted() -> None:
    guard = NonFiniteGuard(policy="stop", max_consecutive=1, scaler_handles_overflow=True, verbose=False)
    for _ in range(3):  # the GradScaler lowers its scale; the loss itself is fine
        assert _verdict(guard, 2.0, math.inf) == (False, False)
    with pytest.raises(NonFiniteError):
        _verdict(guard, math.nan, math.inf)


def test_bad_arguments_fail_with_one_line() -> None:
    with pytest.raises(ValueError, match="allowed: skip | stop"):
        NonFiniteGuard(policy="ignore")
    with pytest.raises(ValueError, match="max_consecutive=0"):
        NonFiniteGuard(max_consecutive=0)


def _ddp_worker(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        guard = NonFiniteGuard(policy="stop", max_consecutive=2, verbose=False)
        verdicts = []
        # Step 1: only rank 1's loss is NaN; 2: all finite and rank 1 was signalled; 3: only rank 0's is
        # inf; 4: NaN again -> stop.
        for bad, signalled in (({1: math.nan}, None), ({}, 1), ({0: math.inf}, None)):
            verdicts.append(_verdict(guard, bad.get(rank, 1.0 + rank), 0.5, float(rank == signalled)))
        try:
            _verdict(guard, math.nan if rank == 1 else 1.0, 0.5)
            verdicts.append("no stop")
        except NonFiniteError as e:
            verdicts.append(str(e).split(";")[0])
        results[rank] = verdicts
    finally:
        dist.destroy_process_group()


def test_all_ranks_reach_the_same_verdict_in_ddp(tmp_path: Path) -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        # fork: the workers reuse the imported torch instead of importing it again (seconds each); they
        # only touch scalars, so no OpenMP pool state is inherited half-used
        mp.start_processes(_ddp_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True,
                           start_method="fork")
        results = dict(results)
    assert results[0] == results[1]
    assert results[0][:3] == [(False, False), (True, True), (False, False)]
    assert results[0][3] == "non-finite values at step 4: loss=nan grad_norm=0.5"
