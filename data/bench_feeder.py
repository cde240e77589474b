"""The training thread's cost of the DALI loader: its CPU per image in next(), feeder inline vs in workers.

    python -m gcvit_data.bench_feeder --root ../shared/imagenet-sample --batch 128 --feeder-workers 0 2

Between batches the main thread stands in for a training step on the GPU for --step-ms, during which the
loader works ahead; what it then spends inside next() is the loader's toll on the thread that launches the
model's kernels. That is measured as the thread's own CPU time (time.thread_time), so it does not count
waiting. `wait_us_per_img` is the wall time next() waited beyond that: non-zero means the loader did not
keep up with the step (raise --step-ms). One JSON line per --feeder-workers value, after one for the
synthetic loader (tensors made once, nothing loaded): the floor that any loader's next() costs on this
machine, which `over_floor_us_per_img` subtracts.

--step model (the default) runs gcvit_tiny's forward and backward at --batch on the meta device, over and
over until --step-ms has passed: the Python and dispatcher work of launching a step's kernels, without a
GPU, so the thread is as busy and its code as warm as a training thread's. --step sleep idles instead: on
a virtual machine whose idle cores run other guests, each torch call right after a sleep then runs cold
(a permute of 8 numbers took 0.15 ms instead of 0.001 on the build machine), which is measured too.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gcvit_data.bench_streams import FULL, Endless, dataset_root
from gcvit_data.config import AugConfig, DataConfig
from gcvit_data.loaders import build_loader


def simulated_step(kind: str, batch: int, device: torch.device) -> Callable[[float], None]:
    """A stand-in for one training step, run on the calling thread for a given number of seconds: on a CUDA
    device gcvit_tiny's real bf16 steps, elsewhere its launches on the meta device."""
    if kind == "sleep":
        return time.sleep
    from gcvit import create_model  # the model only stands in for the training thread's own work

    cuda = device.type == "cuda"
    where = device if cuda else torch.device("meta")
    model = create_model("gcvit_tiny").to(where)
    images = torch.empty(batch, 3, 224, 224, device=where).contiguous(memory_format=torch.channels_last)

    def launch(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while True:  # at least one step: the thread's code is then what a step left warm
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = model(images).float().mean()
            loss.backward()
            if cuda:
                torch.cuda.synchronize(device)
            if time.perf_counter() >= end:
                return

    return launch


def count_calls(fn: Callable[[], Any]) -> tuple[int, int]:
    """The Python and C calls fn() makes on this thread: all of them, and those into torch or DALI. A
    count, unlike a time, does not depend on how warm the machine's caches are."""
    calls, library = 0, 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls, library
        if event in ("call", "c_call") and arg is not sys.setprofile:
            calls += 1
            where = (frame.f_code.co_filename if event == "call"
                     else f"{getattr(arg, '__module__', None) or ''}.{getattr(arg, '__qualname__', '')}")
            library += any(name in where for name in ("torch", "Tensor", "_VariableFunctions", "nvidia"))

    sys.setprofile(profile)  # this thread's only: the runner's and DALI's threads are not counted
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls, library


def measure(root: Path, feeder_workers: int | None, args: argparse.Namespace) -> dict[str, Any]:
    """Median and mean main-thread CPU per image inside next() over --batches paced batches; DALI with that
    many feeder workers, or (None) the synthetic loader: ready tensors, the floor of any loader's next()."""
    loader = "synthetic" if feeder_workers is None else "dali"
    data = DataConfig(root=str(root), loader=loader, batch_size=args.batch, workers=args.threads,
                      prefetch=args.prefetch, index_cache=args.index_cache,
                      feeder_workers=feeder_workers or 0, dali_device=args.dali_device)
    device = torch.device("cuda" if args.dali_device == "gpu" else "cpu")
    aug = AugConfig(rand_augment=None if args.rand_augment == "none" else args.rand_augment)
    stream = Endless(build_loader(data, aug, split="train", img_size=args.img_size, seed=0, rank=0,
                                  world_size=1, device=device, precision=args.precision))
    # the warm-up batches after the first (which builds the pipeline) also count the thread's calls
    stream.next()
    counts = [count_calls(stream.next) for _ in range(args.warmup - 1)]
    step = simulated_step(args.step, args.batch, device)
    runner_thread = getattr(stream.loader, "runner", None)
    runner = time.pthread_getcpuclockid(runner_thread.thread.ident) if runner_thread else None
    runner_start, images = time.clock_gettime(runner) if runner else 0.0, 0
    cpu, wall = [], []
    for _ in range(args.batches):
        step(args.step_ms / 1000)
        c, w = time.thread_time(), time.perf_counter()
        n = len(stream.next().ids)
        cpu.append((time.thread_time() - c) / n * 1e6)
        wall.append((time.perf_counter() - w) / n * 1e6)
        images += n
    runner_us = (time.clock_gettime(runner) - runner_start) / images * 1e6 if runner else 0.0
    waits = [w - c for w, c in zip(wall, cpu)]
    return {"bench": "data.feeder_main_thread", "loader": loader, "feeder_workers": feeder_workers,
            "batch": args.batch, "threads": args.threads, "dali_device": args.dali_device,
            "precision": args.precision, "rand_augment": aug.rand_augment,
            "img_size": args.img_size, "step": args.step, "step_ms": args.step_ms,
            "main_us_per_img_median": round(statistics.median(cpu), 2),
            "main_us_per_img_mean": round(statistics.mean(cpu), 2),
            "wait_us_per_img_median": round(max(0.0, statistics.median(waits)), 2),
            "runner_us_per_img": round(runner_us, 2),
            "main_calls_per_batch": statistics.median(c for c, _ in counts),
            "main_library_calls_per_batch": statistics.median(n for _, n in counts),
            "load_avg": round(os.getloadavg()[0], 1), "cpu_count": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m gcvit_data.bench_feeder",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="dataset root or a bare folder of class folders")
    ap.add_argument("--feeder-workers", type=int, nargs="+", default=[0, DataConfig.feeder_workers])
    ap.add_argument("--threads", type=int, default=2, help="DALI threads")
    ap.add_argument("--dali-device", choices=["cpu", "gpu"], default="cpu",
                    help="gpu: the gpu pipelines, batches and simulated step on CUDA (a GPU node's figure)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="the training precision the batches are made for (bf16: float16 images)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--rand-augment", default=FULL, help="timm RandAugment string, or none")
    ap.add_argument("--step", choices=["model", "sleep"], default="model",
                    help="the simulated training step: gcvit_tiny's launches on the meta device, or idle")
    ap.add_argument("--step-ms", type=float, default=2000, help="simulated training step between batches")
    ap.add_argument("--batches", type=int, default=10, help="measured batches per configuration")
    ap.add_argument("--warmup", type=int, default=4, help="untimed batches first (at least 2)")
    ap.add_argument("--index-cache", default=None, help="index cache dir (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.warmup < 2:
        ap.error("--warmup must be at least 2: the calls are counted on the warm-up batches after the first")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        root = dataset_root(args.root, Path(tmp))
        args.index_cache = args.index_cache or str(Path(tmp) / "index")
        floor = measure(root, None, args)
        print(json.dumps(floor), flush=True)
        for workers in args.feeder_workers:
            row = measure(root, workers, args)
            over = row["main_us_per_img_median"] - floor["main_us_per_img_median"]
            row["over_floor_us_per_img"] = round(over, 2)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
