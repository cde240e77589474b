"""Train-loader throughput: DALI vs the torch/timm DataLoader with the same threads/workers, side by side.

    python -m gcvit_data.bench --root ../shared/imagenet-sample --threads 2 --batch 64 --img-size 224
    python -m gcvit_data.bench --root /data/imagenet --threads 8 --batch 256 --dali-device gpu   # on a GPU

ROOT is a dataset root (ROOT/train/<wnid>/) or a bare folder of class folders (the sample). Each
configuration (with and without RandAugment) prints one JSON line with both loaders' img/s (the median of
rounds that alternate between the loaders, so load from other processes hits both alike) and the ratio.
Pipeline construction and warm-up batches are not timed. Besides wall-clock img/s, each loader's images
per CPU-second are reported (DALI: its threads and feeder processes plus the main thread while DALI is
timed; torch: its worker processes plus the main thread while torch is timed): it is what a core delivers
when fully used, and unlike img/s it barely moves when other processes share the machine.
`*_main_us_per_img` is the CPU the training thread itself spends per image inside the loader (what it
cannot spend launching kernels); compare --feeder-workers 0 (the feeder on that thread) with the default.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from gcvit_data.config import AugConfig, DataConfig
from gcvit_data.loaders import build_loader

FULL = "rand-m9-mstd0.5-inc1"


def dataset_root(root: Path, tmp: Path) -> Path:
    """ROOT itself, or a temporary ROOT whose train/ and val/ link to a bare folder of class folders."""
    if (root / "train").is_dir():
        return root
    for split in ("train", "val"):
        (tmp / split).symlink_to(root.resolve())
    return tmp


class Endless:
    """Batches of a train loader across epoch ends."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.epoch = loader, 0
        self.it = self._restart()

    def _restart(self) -> Any:
        self.loader.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)

    def next(self) -> Any:
        try:
            return next(self.it)
        except StopIteration:
            self.it = self._restart()
            return next(self.it)


def children_cpu_seconds() -> dict[int, float]:
    """CPU time of each live child process of this one (DataLoader workers, DALI's feeder workers)."""
    out = {}
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[1] == me:  # ppid
                out[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def timed(stream: Endless, batches: int, queued: int = 0) -> tuple[int, float, int, float]:
    """(images, wall seconds) of `batches` batches taken after the `queued` batches the loader prepared
    while the other one was timed (they cost no wall time now); (images, main-thread CPU seconds) of all."""
    cpu, first = time.thread_time(), sum(len(stream.next().ids) for _ in range(queued))
    n, tic, batch = 0, time.perf_counter(), None
    for _ in range(batches):
        batch = stream.next()
        n += len(batch.ids)
    if batch is not None and batch.images.is_cuda:  # the last batch is complete only when the GPU's work is
        torch.cuda.synchronize(batch.images.device)
    return n, time.perf_counter() - tic, first + n, time.thread_time() - cpu


def background_cpu(dali_pids: set[int]) -> dict[str, float]:
    """CPU each loader spent off the main thread: DALI's threads (this process's other threads) and feeder
    processes (`dali_pids`); torch's DataLoader workers (the other child processes)."""
    children = children_cpu_seconds()
    mine = sum(t for pid, t in children.items() if pid in dali_pids)
    return {"dali": time.process_time() - time.thread_time() + mine, "torch": sum(children.values()) - mine}


def bench(root: Path, rand_augment: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """Both loaders on the same images and recipe; medians over alternating rounds."""
    aug = AugConfig(rand_augment=rand_augment)
    streams = {}
    for kind in ("dali", "torch"):
        data = DataConfig(root=str(root), loader=kind, dali_device=args.dali_device, batch_size=args.batch,
                          workers=args.threads, prefetch=args.prefetch, index_cache=args.index_cache,
                          feeder_workers=args.feeder_workers)
        loader = build_loader(data, aug, split="train", img_size=args.img_size, seed=0, rank=0, world_size=1,
                              device=torch.device("cuda" if args.dali_device == "gpu" else "cpu"))
        streams[kind] = Endless(loader)
        timed(streams[kind], args.warmup)
    wall: dict[str, list[float]] = {"dali": [], "torch": []}
    images, cpu = {"dali": 0, "torch": 0}, {"dali": 0.0, "torch": 0.0}
    main = dict(cpu)
    # CPU is split by who spends it, not by when: DALI's threads and the DataLoader workers keep
    # prefetching while the other loader is timed. The main thread is charged to the loader being timed.
    # Between its rounds a loader refills its queue (DALI: prefetch batches; torch: prefetch per worker),
    # taking CPU from the other's round; those batches are not timed, so neither gets a head start.
    queued = {"dali": args.prefetch, "torch": args.prefetch * args.threads}
    dali_pids = set(streams["dali"].loader.feeder_pids())
    before = background_cpu(dali_pids)
    for _ in range(args.rounds):
        for kind, stream in streams.items():
            n, seconds, n_all, main_cpu = timed(stream, args.batches, queued[kind])
            wall[kind].append(n / seconds)
            images[kind] += n_all
            cpu[kind] += main_cpu
            main[kind] += main_cpu
    after = background_cpu(dali_pids)
    for kind in cpu:
        cpu[kind] += after[kind] - before[kind]
    med = {k: statistics.median(v) for k, v in wall.items()}
    cpu = {k: images[k] / cpu[k] for k in cpu}
    return {"bench": "data.train_loader", "dali_device": args.dali_device, "rand_augment": rand_augment,
            "img_size": args.img_size, "batch": args.batch, "threads": args.threads,
            "feeder_workers": args.feeder_workers,
            "dali_img_s": round(med["dali"], 1),
            "torch_img_s": round(med["torch"], 1), "ratio": round(med["dali"] / med["torch"], 3),
            "dali_img_per_cpu_s": round(cpu["dali"], 1), "torch_img_per_cpu_s": round(cpu["torch"], 1),
            "cpu_ratio": round(cpu["dali"] / cpu["torch"], 3),
            "dali_main_us_per_img": round(1e6 * main["dali"] / images["dali"], 1),
            "torch_main_us_per_img": round(1e6 * main["torch"] / images["torch"], 1),
            "load_avg": round(os.getloadavg()[0], 1),
            "rounds_img_s": {k: [round(v, 1) for v in vs] for k, vs in wall.items()}}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m gcvit_data.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader worker processes")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--feeder-workers", type=int, default=DataConfig.feeder_workers,
                    help="DALI feeder processes (0: the feeder runs on the training thread)")
    ap.add_argument("--batches", type=int, default=20, help="timed batches per round and loader")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rand-augment", nargs="+", default=[FULL, "none"],
                    help="configurations: timm RandAugment strings, or none")
    ap.add_argument("--index-cache", default=None, help="index cache dir (default: beside the data)")
    ap.add_argument("--dali-device", choices=("cpu", "gpu"), default="cpu",
                    help="gpu: nvJPEG decode and every op on the GPU; both loaders then deliver to cuda:0")
    ap.add_argument("--json-out", type=Path, default=None,
                    help="also write the rows with the device, versions and commit (benchmarks/results)")
    args = ap.parse_args(argv)
    if args.dali_device == "gpu" and not torch.cuda.is_available():
        ap.error("--dali-device gpu needs a CUDA GPU, and torch sees none here")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        root = dataset_root(args.root, Path(tmp))
        args.index_cache = args.index_cache or str(Path(tmp) / "index")
        rows = []
        for ra in args.rand_augment:
            rows.append(bench(root, None if ra == "none" else ra, args))
            print(json.dumps(rows[-1]), flush=True)
    if args.json_out:
        from gcvit.bench import environment

        device = torch.device("cuda" if args.dali_device == "gpu" else "cpu")
        report = {**environment(device), "dali": _dali_version(), "cpus": os.cpu_count(),
                  "args": {k: str(v) for k, v in vars(args).items()}, "results": rows}
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _dali_version() -> str:
    from nvidia.dali import __version__

    return __version__


if __name__ == "__main__":
    raise SystemExit(main())
