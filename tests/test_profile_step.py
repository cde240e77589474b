"""benchmarks/profile_step.py's variants, on CPU: each computes what the model computes (within bf16 rounding
where it changes precision) and its undo restores the model bit for bit. The rates are for a GPU (the kit)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import gcvit

SPEC = importlib.util.spec_from_file_location(
    "profile_step", Path(__file__).resolve().parents[1] / "benchmarks" / "profile_step.py")
profile_step = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(profile_step)


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(3)  # the same drop-path draws for every variant
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(x).float()


@pytest.mark.parametrize("variant", list(profile_step.VARIANTS))
def test_each_variant_computes_the_same_and_undoes_itself(variant: str) -> None:
    torch.manual_seed(0)
    model = gcvit.create_model("gcvit_xxtiny", img_size=64, num_classes=10, drop_path_rate=0.3).train()
    x = torch.randn(4, 3, 64, 64)
    as_is = _logits(model, x)
    undo = profile_step.VARIANTS[variant](model)
    changed = _logits(model, x)
    undo()
    torch.testing.assert_close(changed, as_is, atol=0.05, rtol=0.05)
    assert torch.equal(_logits(model, x), as_is)


def test_ln_mixed_runs_the_norms_on_the_low_precision_input_with_fp32_parameters() -> None:
    model = gcvit.create_model("gcvit_xxtiny", img_size=64, num_classes=10)
    norm, x = model.stages[0].blocks[0].norm1, torch.randn(2, 4, 4, 64)
    undo = profile_step.VARIANTS["ln_mixed"](model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = norm(x)
        undo()
        plain = norm(x)
    assert (mixed.dtype, plain.dtype, norm.weight.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    torch.testing.assert_close(mixed.float(), plain, atol=0.03, rtol=0.02)
