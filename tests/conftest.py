"""Shared pytest fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_ROOT = REPO_ROOT.parent / "shared" / "imagenet-sample"


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    """The 1000 real ImageNet JPEGs beside the checkout; skipped on a fresh clone that lacks them."""
    if not (SAMPLE_ROOT / "classes.tsv").is_file():
        pytest.skip(f"{SAMPLE_ROOT} is absent (only our build machines have it); "
                    "the same guarantees are covered by tests on generated images")
    return SAMPLE_ROOT
