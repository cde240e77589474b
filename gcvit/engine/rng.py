"""Per-rank random state: the seeds of one optimizer step, and the generators' state a checkpoint keeps."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed python/numpy/torch for one optimizer step from (seed, rank, step).

    Loader iterators and evaluation draw from the global generators at points that differ between an
    uninterrupted and a resumed run; reseeding every step keeps Mixup, erasing and drop path identical.
    """
    s = int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)  # every CUDA device too


def rng_state() -> dict[str, Any]:
    """This rank's generator states as tensors and plain types (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of rng_state()."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
