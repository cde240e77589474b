"""Model FLOPs utilisation: the GPUs' peak FLOP/s by name and precision, and the training FLOPs of one image.

MFU = img/s x training FLOPs per image / (peak FLOP/s x ranks), in each train record of metrics.jsonl
(gcvit.engine.metrics.Window.record).
"""
from __future__ import annotations

import re

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets, by a pattern of torch.cuda.get_device_name():
# (bf16 = fp16, fp32 as TF32 on tensor cores, which the trainer enables). The first match wins, so the PCIe
# and NVL cards come before the SXM parts that share their name ("NVIDIA H100 80GB HBM3"). A card that
# matches nothing gets no figure (mfu: null), never a guessed one.
_PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756.0, 378.0),
    (r"\bH100\b.*\bNVL\b", 835.0, 417.5),
    (r"\bH200\b.*\bNVL\b", 835.0, 417.5),
    (r"\bG?H200\b", 989.0, 494.5),  # H200 SXM, GH200
    (r"\bH100\b", 989.0, 494.5),  # H100 SXM
    (r"\bA100\b", 312.0, 156.0),  # every A100 form factor
    (r"\bL40S\b", 362.0, 183.0),
    (r"\bA10\b", 125.0, 62.5),  # not the A10G, a different chip
)


def peak_tflops(name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of the GPU named `name` at `precision` (fp32 as TF32); None if not in the table."""
    for pattern, half, tf32 in _PEAK_TFLOPS:
        if re.search(pattern, name):
            return tf32 if precision == "fp32" else half
    return None


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one accelerator at `precision`, None on CPU, an unknown card or fp32 without TF32."""
    if device.type != "cuda":
        return None
    if precision == "fp32" and not torch.backends.cuda.matmul.allow_tf32:
        return None  # trainer.deterministic turns TF32 off: plain fp32 peaks are not in the table
    tflops = peak_tflops(torch.cuda.get_device_name(device), precision)
    return None if tflops is None else tflops * 1e12


def train_flops_per_image(model: nn.Module, img_size: int, device: torch.device) -> float:
    """Forward FLOPs of one image counted by torch's FlopCounterMode, x3 for forward plus backward."""
    x = torch.zeros(1, 3, img_size, img_size, device=device)
    was_training = model.training
    model.eval()
    # with gradients on, as in a train step: a no-grad forward on CPU may take SDPA's fused CPU kernel,
    # which the counter does not count
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return 3.0 * counter.get_total_flops()
