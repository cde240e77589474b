"""The training thread's cost of the DALI loader: its CPU per image in next(), feeder inline vs in workers.

    python -m gcvit_data.bench_feeder --root ../shared/imagenet-sample --batch 128 --feeder-workers 0 2

Between batches the main thread sleeps for --step-ms, standing in for a training step on the GPU during
which the loader works ahead; what it then spends inside next() is the loader's toll on the thread that
launches the model's kernels. That is measured as the thread's own CPU time (time.thread_time), so it does
not count waiting and barely moves when other processes share the machine. `wait_us_per_img` is the wall
time next() waited beyond that: non-zero means the loader did not keep up with the step (raise --step-ms).
One JSON line per --feeder-workers value.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from gcvit_data.bench import FULL, Endless, dataset_root
from gcvit_data.config import AugConfig, DataConfig
from gcvit_data.loaders import build_loader


def measure(root: Path, feeder_workers: int, args: argparse.Namespace) -> dict[str, Any]:
    """Median and mean main-thread CPU per image inside next() over --batches paced batches."""
    data = DataConfig(root=str(root), loader="dali", batch_size=args.batch, workers=args.threads,
                      prefetch=args.prefetch, index_cache=args.index_cache, feeder_workers=feeder_workers)
    aug = AugConfig(rand_augment=None if args.rand_augment == "none" else args.rand_augment)
    stream = Endless(build_loader(data, aug, split="train", img_size=args.img_size, seed=0, rank=0,
                                  world_size=1, device=torch.device("cpu")))
    for _ in range(args.warmup):
        stream.next()
    runner = time.pthread_getcpuclockid(stream.loader.runner.thread.ident)
    runner_start, images = time.clock_gettime(runner), 0
    cpu, wall = [], []
    for _ in range(args.batches):
        time.sleep(args.step_ms / 1000)
        c, w = time.thread_time(), time.perf_counter()
        n = len(stream.next().ids)
        cpu.append((time.thread_time() - c) / n * 1e6)
        wall.append((time.perf_counter() - w) / n * 1e6)
        images += n
    runner_us = (time.clock_gettime(runner) - runner_start) / images * 1e6
    waits = [w - c for w, c in zip(wall, cpu)]
    return {"bench": "data.feeder_main_thread", "feeder_workers": feeder_workers, "batch": args.batch,
            "threads": args.threads, "rand_augment": aug.rand_augment, "img_size": args.img_size,
            "step_ms": args.step_ms, "main_us_per_img_median": round(statistics.median(cpu), 2),
            "main_us_per_img_mean": round(statistics.mean(cpu), 2),
            "wait_us_per_img_median": round(max(0.0, statistics.median(waits)), 2),
            "runner_us_per_img": round(runner_us, 2),
            "load_avg": round(os.getloadavg()[0], 1), "cpu_count": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m gcvit_data.bench_feeder",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="dataset root or a bare folder of class folders")
    ap.add_argument("--feeder-workers", type=int, nargs="+", default=[0, DataConfig.feeder_workers])
    ap.add_argument("--threads", type=int, default=2, help="DALI threads")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--rand-augment", default=FULL, help="timm RandAugment string, or none")
    ap.add_argument("--step-ms", type=float, default=2000, help="simulated training step between batches")
    ap.add_argument("--batches", type=int, default=10, help="measured batches per configuration")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--index-cache", default=None, help="index cache dir (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        root = dataset_root(args.root, Path(tmp))
        args.index_cache = args.index_cache or str(Path(tmp) / "index")
        for workers in args.feeder_workers:
            print(json.dumps(measure(root, workers, args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
