"""The AdamW step on CPU: torch's fused kernel against its default (foreach) one, on a real model's
parameter groups (the trainer's weight-decay split), side by side in one process, interleaved.

    python benchmarks/optim_step_cpu.py [--model gcvit_tiny] [--steps 20] [--rounds 5] [--threads N]

Prints the median time per step of each and their ratio; the trainer uses the fused kernel on CPU when it
is the faster one (gcvit/engine/optim.py).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from gcvit.engine.optim import param_groups
from gcvit.models import create_model


def _optimizer(model: torch.nn.Module, fused: bool) -> torch.optim.AdamW:
    groups = param_groups(model, 0.05, model.no_weight_decay())
    return torch.optim.AdamW(groups, lr=1e-3, fused=fused or None)


def _time(opt: torch.optim.Optimizer, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gcvit_tiny")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per timed round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {kind: create_model(args.model) for kind in ("foreach", "fused")}
    for model in models.values():
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
    opts = {kind: _optimizer(m, kind == "fused") for kind, m in models.items()}
    for opt in opts.values():
        _time(opt, 2)  # the moments are allocated on the first step
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(args.rounds):
        for kind, opt in opts.items():
            times[kind].append(_time(opt, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    n = sum(p.numel() for p in models["fused"].parameters())
    print(f"{args.model}: {n / 1e6:.1f}M parameters, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    for kind, t in med.items():
        print(f"  AdamW {kind:8s} {t * 1e3:8.1f} ms/step")
    print(f"  fused speed-up: {med['foreach'] / med['fused']:.2f}x")


if __name__ == "__main__":
    main()
