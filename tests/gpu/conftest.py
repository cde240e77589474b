"""The GPU tier: every test here is marked `gpu` and skipped with one reason on a machine without CUDA."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

NO_CUDA = "no CUDA device: the gpu tier runs on a GPU machine (bash benchmarks/gpu_kit.sh)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark this folder's tests `gpu`; without CUDA skip them all with one clear reason."""
    for item in items:
        if "tests/gpu/" in item.nodeid:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason=NO_CUDA))


@pytest.fixture
def cuda() -> Iterator[torch.device]:
    """The current CUDA device, with TF32 off so fp32 references are true fp32 (restored after the test)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield torch.device("cuda", torch.cuda.current_device())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
