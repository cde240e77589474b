"""Where a bf16 train step of our GC ViT spends its GPU time, and what candidate changes would gain: the step
rate of the model as it is and of each variant, one after another in one process (the model as it is first
and last), then the top CUDA kernels of a step.

    python benchmarks/profile_step.py --model gcvit_tiny --batch 128 [--top 25] [--json-out FILE]

Variants (each applied, timed, undone; the model as it is is timed before and after them):
- math: the attention written out (the CPU form) instead of SDPA's fused kernel;
- ln_mixed: the LayerNorms whose output feeds a GEMM or a convolution (each block's two, each downsampler's
  first) take the bf16 input with fp32 affine parameters, outside autocast, which would run them in fp32;
- drop_kept: drop path draws its per-sample keep mask on the host and runs each residual branch on the kept
  samples only, as the CPU does (the indices reach the GPU by a pinned, non-blocking copy: no sync).
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gcvit.engine.provenance import environment
from gcvit.models import create_model, gcvit, ops


def step_fn(model: nn.Module, batch: int) -> Callable[[], None]:
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def rate(step: Callable[[], None], batch: int, iters: int = 20) -> float:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - t)


def _math_attention(model: nn.Module) -> Callable[[], None]:
    fused = ops.fused
    ops.fused = lambda q: False
    return lambda: setattr(ops, "fused", fused)


def _mixed_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    with torch.autocast(device, enabled=False):
        return F.layer_norm(x.to(torch.get_autocast_dtype(device)), norm.normalized_shape, norm.weight,
                            norm.bias, norm.eps)


def _ln_mixed(model: nn.Module) -> Callable[[], None]:
    blocks = [m for m in model.modules() if isinstance(m, gcvit.GCViTBlock)]
    norms = [norm for blk in blocks for norm in (blk.norm1, blk.norm2)]
    channel = [m.norm1 for m in model.modules() if isinstance(m, gcvit.ReduceSize)]
    for norm in norms:
        norm.forward = lambda x, norm=norm: _mixed_norm(norm, x)
    for norm in channel:  # NCHW in and out, a free permute on channels_last maps
        norm.forward = lambda x, norm=norm: _mixed_norm(norm, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def undo() -> None:
        for norm in norms + channel:
            del norm.forward
    return undo


def _host_kept_rows(x: torch.Tensor, keep: float) -> torch.Tensor:
    rows = torch.empty(x.shape[0]).bernoulli_(keep).nonzero().flatten()
    return rows if x.device.type == "cpu" else rows.pin_memory().to(x.device, non_blocking=True)


def _drop_kept(model: nn.Module) -> Callable[[], None]:
    kept_rows = gcvit.kept_rows
    gcvit.kept_rows = _host_kept_rows
    return lambda: setattr(gcvit, "kept_rows", kept_rows)


VARIANTS = {"math": _math_attention, "ln_mixed": _ln_mixed, "drop_kept": _drop_kept}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gcvit_tiny")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json-out", help="also write the rates, with device and versions, to this JSON file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step: no CUDA device; it times bf16 train steps on a GPU")
    model = create_model(args.model, drop_path_rate=0.2).cuda().train()
    step = step_fn(model, args.batch)
    rates = {"as_is": rate(step, args.batch)}
    for name, apply in VARIANTS.items():
        undo = apply(model)
        rates[name] = rate(step, args.batch)
        undo()
    rates["as_is_again"] = rate(step, args.batch)
    result = {"model": args.model, "batch": args.batch,
              "train_img_s": {k: round(v, 1) for k, v in rates.items()},
              "vs_as_is": {k: round(v / rates["as_is"], 3) for k, v in rates.items()}}
    print(json.dumps(result), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({**result, "environment": environment(torch.device("cuda"))}, f, indent=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))


if __name__ == "__main__":
    main()
