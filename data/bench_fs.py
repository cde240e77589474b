"""File-system operations per image of a train loader: opens and stats of the data, counted by strace.

A cluster filesystem's metadata server pays for every open and path lookup, so `python -m gcvit_data.bench
--fs-ops` runs each loader and format in a child process (this module's --child mode) under

    strace -f -y -e trace=openat,open,statx,newfstatat,stat,lstat,fstat -o LOG

twice, taking `batches` and then 2 x `batches` batches after the same warm-up, then waiting --settle
seconds so that both runs exit with the loader's queues full (the same number of batches prepared ahead).
The difference between the two runs, divided by the images it adds, is the steady-state count per image:
start-up (imports, the index, opening a pack's shards) cancels out (the two runs' totals are reported too).
Only calls that name a file of the dataset count (their path, or with -y the path behind their descriptor,
is under ROOT or what its links point to): the loader's other files (its /dev/shm plan, /proc) are not on
the shared filesystem.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gcvit_data.bench_streams import Endless
from gcvit_data.config import AugConfig, DataConfig
from gcvit_data.loaders import build_loader

SYSCALLS = {"open": ("openat", "open"), "stat": ("statx", "newfstatat", "stat", "lstat", "fstat")}
_CALL = re.compile(r"^(?:\d+\s+)?(\w+)\(")


def data_prefixes(root: Path) -> list[str]:
    """The path prefixes a dataset file can be opened under: ROOT, ROOT/<split> and where links lead."""
    paths = {root, root.resolve()}
    for split in ("train", "val"):
        if (root / split).exists():
            paths |= {root / split, (root / split).resolve()}
    return sorted({str(p).rstrip("/") + "/" for p in paths})


def count_calls(log: str, prefixes: list[str]) -> dict[str, int]:
    """Opens and stats in a strace log that name a dataset file (a "resumed" line is not a new call)."""
    counts = dict.fromkeys(SYSCALLS, 0)
    for line in log.splitlines():
        m = _CALL.match(line)
        if m is None or not any(p in line for p in prefixes):
            continue
        for kind, names in SYSCALLS.items():
            counts[kind] += m.group(1) in names
    return counts


def _traced(root: Path, loader: str, batches: int, args: argparse.Namespace, tmp: Path) -> dict[str, int]:
    log = tmp / f"{loader}-{batches}.strace"
    cmd = ["strace", "-f", "-y", "-qq", "-e", "trace=" + ",".join(sum(SYSCALLS.values(), ())), "-o", str(log),
           sys.executable, "-m", "gcvit_data.bench_fs", "--child", str(root), "--loader", loader,
           "--batches", str(batches), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--img-size", str(args.img_size), "--threads", str(args.threads),
           "--feeder-workers", str(args.feeder_workers), "--index-cache", str(args.index_cache),
           "--settle", str(args.settle)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"bench: the traced {loader} run on {root} failed ({tail})")
    return count_calls(log.read_text(errors="replace"), data_prefixes(root))


def fs_ops(root: Path, loader: str, args: argparse.Namespace) -> dict[str, Any]:
    """Opens and stats of dataset files per image in steady state for one loader."""
    if shutil.which("strace") is None:
        return {"fs_ops": "strace not found: install it to count file-system operations"}
    with tempfile.TemporaryDirectory() as tmp:
        one = _traced(root, loader, args.fs_batches, args, Path(tmp))
        two = _traced(root, loader, 2 * args.fs_batches, args, Path(tmp))
    images = args.fs_batches * args.batch
    out: dict[str, Any] = {f"{k}s_per_img": round((two[k] - one[k]) / images, 4) for k in SYSCALLS}
    # the totals hold start-up and the batches the loader had queued when the run ended
    out.update({f"{kind}s_in_runs": [one[kind], two[kind]] for kind in SYSCALLS})
    return out


def child(args: argparse.Namespace) -> None:
    """Take --warmup then --batches train batches, let the loader fill its queues (the process strace
    counts)."""
    torch.set_num_threads(1)
    data = DataConfig(root=str(args.child), loader=args.loader, batch_size=args.batch, workers=args.threads,
                      index_cache=args.index_cache, feeder_workers=args.feeder_workers)
    stream = Endless(build_loader(data, AugConfig(rand_augment=None), split="train", img_size=args.img_size,
                                  seed=0, rank=0, world_size=1, device=torch.device("cpu")))
    for _ in range(args.warmup + args.batches):
        stream.next()
    time.sleep(args.settle)


def main(argv: list[str] | None = None) -> int:
    """The traced child (called by gcvit_data.bench --fs-ops)."""
    ap = argparse.ArgumentParser(prog="python -m gcvit_data.bench_fs", description=__doc__.splitlines()[0])
    ap.add_argument("--child", type=Path, required=True, help="dataset root or pack")
    ap.add_argument("--loader", choices=("dali", "torch"), default="dali")
    for name, default in (("batches", 4), ("warmup", 2), ("batch", 64), ("img-size", 224), ("threads", 2),
                          ("feeder-workers", 2)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--index-cache", default=None)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds to wait before exiting")
    child(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
