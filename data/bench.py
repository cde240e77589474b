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

Folder vs packed shards (docs/shards.md) vs timm's WebDataset shards vs the links prepare --from-kaggle
makes, the same images every way:

    python -m gcvit_data.bench --root ../shared/imagenet-sample --format folder shards wds links \
        --loaders dali --fs-ops

makes each form of ROOT's train split in a temporary folder once (packed; written as WebDataset shards; a
folder of links to its class folders), then times every loader on every format in the same alternating
rounds (keys `<loader>_<format>_img_s`, and `<loader>_<format>_vs_folder`, the ratio of img/s). Images per
CPU-second need one loader of each kind and are left out then. --fs-ops also counts the opens and stats of
dataset files per image of each (gcvit_data.bench_fs: strace on a child process). A ROOT that is a pack or
WebDataset shards (timm's download: its _info.json) is read in place as `--format shards` or `wds`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from gcvit.engine.provenance import environment, package_versions
from gcvit_data import bench_fs
from gcvit_data.bench_streams import FULL, Endless, dataset_root, write_wds
from gcvit_data.config import AugConfig, DataConfig
from gcvit_data.loaders import build_loader
from gcvit_data.pack import pack, parse_size
from gcvit_data.prepare_kaggle import link_train
from gcvit_data.readers import folder, load_index, source_of
from gcvit_data.readers import pack as pack_source
from gcvit_data.readers import wds as wds_source

FORMAT_OF = {folder: "folder", pack_source: "shards", wds_source: "wds"}  # a root's own form, by its reader


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


def bench(roots: dict[str, Path], rand_augment: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """Every loader on every format (folder, shards) of the same images and recipe; medians over
    alternating rounds."""
    aug = AugConfig(rand_augment=rand_augment)
    streams = {}
    for fmt, root in roots.items():
        for kind in args.loaders:
            data = DataConfig(root=str(root), loader=kind, dali_device=args.dali_device,
                              batch_size=args.batch, workers=args.threads, prefetch=args.prefetch,
                              index_cache=args.index_cache, feeder_workers=args.feeder_workers,
                              hw_decoder_load=args.hw_decoder_load)
            device = torch.device("cuda" if args.dali_device == "gpu" else "cpu")
            loader = build_loader(data, aug, split="train", img_size=args.img_size, seed=0, rank=0,
                                  world_size=1, device=device)
            label = kind if len(roots) == 1 else f"{kind}_{fmt}"
            streams[label] = Endless(loader)
            timed(streams[label], args.warmup)
    wall: dict[str, list[float]] = {k: [] for k in streams}
    images, main = dict.fromkeys(streams, 0), dict.fromkeys(streams, 0.0)
    # CPU is split by who spends it, not by when: DALI's threads and the DataLoader workers keep
    # prefetching while the other loader is timed. The main thread is charged to the loader being timed.
    # Between its rounds a loader refills its queue (DALI: prefetch batches; torch: prefetch per worker),
    # taking CPU from the other's round; those batches are not timed, so neither gets a head start.
    queued = {k: args.prefetch * (1 if k.startswith("dali") else args.threads) for k in streams}
    # only with one DALI and one torch loader do threads and processes tell whose CPU it was
    per_cpu = set(streams) == {"dali", "torch"}
    dali_pids = set(streams["dali"].loader.feeder_pids()) if per_cpu else set()
    before = background_cpu(dali_pids)
    for _ in range(args.rounds):
        for kind, stream in streams.items():
            n, seconds, n_all, main_cpu = timed(stream, args.batches, queued[kind])
            wall[kind].append(n / seconds)
            images[kind] += n_all
            main[kind] += main_cpu
    after = background_cpu(dali_pids)
    med = {k: statistics.median(v) for k, v in wall.items()}
    row: dict[str, Any] = {"bench": "data.train_loader", "dali_device": args.dali_device,
                           "rand_augment": rand_augment, "img_size": args.img_size, "batch": args.batch,
                           "threads": args.threads, "feeder_workers": args.feeder_workers,
                           "hw_decoder_load": args.hw_decoder_load}
    row.update({f"{k}_img_s": round(med[k], 1) for k in streams})
    if per_cpu:
        cpu = {k: images[k] / (main[k] + after[k] - before[k]) for k in streams}
        row.update(ratio=round(med["dali"] / med["torch"], 3), dali_img_per_cpu_s=round(cpu["dali"], 1),
                   torch_img_per_cpu_s=round(cpu["torch"], 1), cpu_ratio=round(cpu["dali"] / cpu["torch"], 3))
    if len(roots) > 1 and "folder" in roots:
        row.update({f"{k}_{fmt}_vs_folder": round(med[f"{k}_{fmt}"] / med[f"{k}_folder"], 3)
                    for fmt in roots if fmt != "folder" for k in args.loaders})
    row.update({f"{k}_main_us_per_img": round(1e6 * main[k] / images[k], 1) for k in streams})
    row.update(load_avg=round(os.getloadavg()[0], 1),
               rounds_img_s={k: [round(v, 1) for v in vs] for k, vs in wall.items()})
    return row


def formats(root: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Path]:
    """The dataset root of each --format: ROOT itself in its own form; an image folder's train split
    packed into `tmp` once, written there as WebDataset shards once, or linked as prepare --from-kaggle
    links it (a folder of links to the class folders)."""
    roots = {}
    for fmt in args.format:
        if fmt == FORMAT_OF[source_of(root)]:
            roots[fmt] = root
        elif fmt == "links":
            train = root / "train"
            link_train(train, sorted(p.name for p in train.iterdir() if p.is_dir()), tmp / "links", {})
            roots[fmt] = tmp / "links"
        elif fmt == "wds":
            roots[fmt] = write_wds({"train": load_index(root, "train", index_cache=args.index_cache)},
                                   tmp / "wds", shard_size=parse_size(args.shard_size))
            print(f"wrote the train split as WebDataset shards in {tmp / 'wds'}", file=sys.stderr)
        else:
            manifest = pack(root, tmp / "pack", shard_size=parse_size(args.shard_size),
                            workers=max(1, args.threads), splits=("train",), progress=False)
            roots[fmt] = tmp / "pack"
            print(f"packed the train split into {len(manifest['splits']['train']['shards'])} shards in "
                  f"{tmp / 'pack'}", file=sys.stderr)
    return roots


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
    ap.add_argument("--hw-decoder-load", type=float, default=DataConfig.hw_decoder_load,
                    help="gpu: share of JPEGs for the hardware JPEG decoder (data.hw_decoder_load)")
    ap.add_argument("--loaders", nargs="+", choices=("dali", "torch"), default=["dali", "torch"])
    ap.add_argument("--format", nargs="+", choices=("folder", "shards", "wds", "links"), default=None,
                    help="read the images from their folder, packed into shards (gcvit_data.pack), written "
                         "as timm-style WebDataset shards or linked as prepare --from-kaggle does first; "
                         "several: side by side (default: ROOT's own form)")
    ap.add_argument("--shard-size", default="1GB", help="shard size of --format shards and wds (1GB, 512MB)")
    ap.add_argument("--fs-ops", action="store_true",
                    help="also count opens and stats of dataset files per image (strace on a child process)")
    ap.add_argument("--fs-batches", type=int, default=4, help="batches the two --fs-ops runs differ by")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds an --fs-ops run waits for the loader's queues to fill before it exits")
    ap.add_argument("--json-out", type=Path, default=None,
                    help="also write the rows with the device, versions and commit (benchmarks/results)")
    args = ap.parse_args(argv)
    if args.dali_device == "gpu" and not torch.cuda.is_available():
        ap.error("--dali-device gpu needs a CUDA GPU, and torch sees none here")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        root = dataset_root(args.root, Path(tmp) / "root")
        own = FORMAT_OF[source_of(root)]
        args.format = args.format or [own]
        if own != "folder" and args.format != [own]:
            ap.error(f"{args.root} is read as --format {own} (in place); the other forms are made from an "
                     "image folder")
        args.index_cache = args.index_cache or str(Path(tmp) / "index")
        roots = formats(root, args, Path(tmp))
        rows = []
        for ra in args.rand_augment:
            rows.append(bench(roots, None if ra == "none" else ra, args))
            print(json.dumps(rows[-1]), flush=True)
        for fmt, fmt_root in roots.items() if args.fs_ops else ():
            for kind in args.loaders:
                rows.append({"bench": "data.fs_ops", "loader": kind, "format": fmt, "batch": args.batch,
                             **bench_fs.fs_ops(fmt_root, kind, args)})
                print(json.dumps(rows[-1]), flush=True)
    if args.json_out:
        device = torch.device("cuda" if args.dali_device == "gpu" else "cpu")
        dali = next((v for k, v in package_versions().items() if k.startswith("nvidia-dali")), None)
        report = {**environment(device), "dali": dali, "cpus": os.cpu_count(),
                  "args": {k: str(v) for k, v in vars(args).items()}, "results": rows}
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
