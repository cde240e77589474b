"""How this process computes: threads and deterministic kernels (set before anything runs), and autocast."""
from __future__ import annotations

import contextlib
import os

import torch

from gcvit.config import Config

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def configure_runtime(cfg: Config) -> None:
    """Threads and (optionally) deterministic kernels, before any model or data exists."""
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    if cfg.trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast, or nothing for fp32."""
    dtype = _DTYPES[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CPU work is done already), e.g. before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
