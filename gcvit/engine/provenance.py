"""Where a result was produced: the code's commit, the installed package versions, the device it ran on."""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

_REPO = Path(__file__).resolve().parents[2]
_PACKAGES = ("torch", "torchvision", "timm", "hydra-core", "omegaconf", "wandb", "numpy", "pillow",
             "nvidia-dali-cuda130", "nvidia-dali-cuda120", "submitit")


def git_commit() -> str | None:
    """GCVIT_COMMIT where set (a copy without .git), else this checkout's HEAD, "-dirty" if tracked files
    changed; None outside a checkout."""
    if os.environ.get("GCVIT_COMMIT"):
        return os.environ["GCVIT_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else None


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a run depends on (those not installed are left out)."""
    versions = {}
    for pkg in _PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    return versions


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's (the processor, else the machine type)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Where a measurement was taken: device, torch/CUDA/cuDNN/timm versions, code commit."""
    cuda = device.type == "cuda"
    env = {"device_name": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if cuda else None, "commit": git_commit()}
    with contextlib.suppress(ImportError):
        import timm
        env["timm"] = timm.__version__
    return env
