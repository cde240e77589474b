"""Where a bf16 train step of our GC ViT spends its GPU time: the top kernels, and the step rate with the
attention through the fused kernel or written out (the CPU math), measured in one process.

    python benchmarks/profile_step.py --model gcvit_tiny --batch 128 [--top 25]
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gcvit.models import create_model, ops


def step_fn(model: torch.nn.Module, batch: int) -> Callable[[], None]:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="gcvit_tiny")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    model = create_model(args.model, drop_path_rate=0.2).cuda().train()
    step = step_fn(model, args.batch)
    fused = ops.fused
    rates = {"fused": rate(step, args.batch)}
    ops.fused = lambda q: False  # the written-out math on the GPU too
    rates["math"] = rate(step, args.batch)
    ops.fused = fused
    rates["fused_again"] = rate(step, args.batch)
    print(json.dumps({"model": args.model, "batch": args.batch, "train_img_s": rates}), flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))


if __name__ == "__main__":
    main()
