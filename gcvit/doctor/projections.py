"""Rank 0's rows that weigh measured figures against the recipe: the storage against the training rate, the
gradient all-reduce against a step, checkpoints against free disk, and the interconnect's bandwidth."""
from __future__ import annotations

import glob
import json
from pathlib import Path

import torch

from gcvit.config import Config
from gcvit.doctor import checks, cluster
from gcvit.doctor.checks import OK, WARN, Row, human_bytes
from gcvit.doctor.ranks import Facts
from gcvit.engine.distributed import DistEnv
from gcvit.engine.run_dir import run_dir_for

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
FALLBACK_IMG_S = 2000.0  # per GPU without a recorded benchmark: a bit above gcvit_tiny bf16 on an H200
SLOW_FRACTION = 0.5  # an all-reduce below this share of the expected busbw is a WARN
LARGE_MB = 64.0  # messages from this size on are bandwidth-bound, comparable with the expected figure


def model_bytes(cfg: Config, num_classes: int) -> tuple[int, int]:
    """(parameters, bytes of the model's state_dict) of the configured model, built on the meta device."""
    from gcvit.models import create_model  # here: timm's import takes seconds, `--help` should not wait

    with torch.device("meta"):
        model = create_model(cfg.model.name, num_classes=num_classes, img_size=cfg.model.img_size,
                             **cfg.model.overrides)
    params = sum(p.numel() for p in model.parameters())
    return params, sum(t.numel() * t.element_size() for t in model.state_dict().values())


def target_rate(model: str, given: float | None) -> tuple[float, str]:
    """img/s one GPU trains `model` at: --target-img-s, else the best recorded benchmark, else a default."""
    if given:
        return given, "--target-img-s"
    best = None
    for path in glob.glob(str(RESULTS / f"gpu-{model}-*.json")):
        with open(path) as f:
            doc = json.load(f)
        rate = doc.get("result", {}).get("ours", {}).get("train_img_s")
        if rate and (best is None or rate > best[0]):
            best = (float(rate), f"{Path(path).name} on {doc.get('device_name', '?')}")
    return best or (FALLBACK_IMG_S, "default; set --target-img-s")


def _gpus(env: DistEnv) -> int:
    """GPUs the training will use: the launched ranks, or every visible GPU of a plainly launched check."""
    return env.world_size if env.distributed else max(1, torch.cuda.device_count())


def cluster_rows(env: DistEnv, nodes: int, measured: cluster.AllReduce | None) -> list[Row]:
    """The interconnect, and the all-reduce bus bandwidth measured over it against what it should reach."""
    fabric = cluster.detect(env.device.type == "cuda", nodes)
    expected = fabric.expected_busbw
    rows = [Row("interconnect", OK, f"{fabric.kind}, expected all-reduce busbw "
                + (f"~{expected:.0f} GB/s" if expected else "unknown") + f" ({fabric.basis})",
                {"kind": fabric.kind, "expected_busbw_gbps": expected})]
    if measured is None:
        rows.append(Row("allreduce", OK, "single process: nothing to all-reduce (launch under torchrun or "
                        "srun with the job's ranks to measure)"))
        return rows
    m = measured
    values = {"ranks": m.ranks, "nodes": nodes, "backend": m.backend, "megabytes": m.megabytes,
              "seconds": m.seconds, "rank_seconds": m.rank_seconds, "algbw_gbps": m.algbw,
              "busbw_gbps": m.busbw}
    detail = (f"{m.backend}, {m.ranks} ranks on {nodes} node(s), {m.megabytes:.0f} MB: busbw {m.busbw:.2f} "
              f"GB/s (algbw {m.algbw:.2f} GB/s; slowest rank {m.rank_seconds.index(m.seconds)})")
    # Small messages are latency-bound: only a large one is compared with the large-message figure.
    if expected and m.megabytes >= LARGE_MB and m.busbw < SLOW_FRACTION * expected:
        rows.append(Row("allreduce", WARN, f"{detail}, under {SLOW_FRACTION:.0%} of the ~{expected:.0f} GB/s "
                        f"{fabric.kind} reaches: NCCL_DEBUG=INFO shows the transport NCCL chose (NET/Socket "
                        "instead of IB? P2P disabled?)", values))
    else:
        rows.append(Row("allreduce", OK, detail, values))
    return rows


def grad_sync_row(cfg: Config, measured: cluster.AllReduce | None, classes: int | None, rate: float) -> Row:
    """One all-reduce of the model's gradients at the measured busbw against an optimizer step's time."""
    params = model_bytes(cfg, classes or 1000)[0]
    grad_bytes = 4 * params  # DDP reduces the fp32 parameters' gradients: fp32 under autocast too
    grads = f"{params / 1e6:.1f}M params = {human_bytes(grad_bytes)} of fp32 gradients"
    if measured is None:
        return Row("grad-sync", OK, f"{grads}; no all-reduce with one process", {"params": params})
    sync = cluster.allreduce_seconds(grad_bytes, measured.ranks, measured.busbw)
    # The loop all-reduces once per optimizer step, after `accum` micro-batches of data.batch_size.
    per_rank = cfg.trainer.global_batch_size // measured.ranks
    step = per_rank / rate
    detail = (f"{grads}: {sync * 1e3:.1f} ms per all-reduce at the measured busbw, {sync / step:.0%} of a "
              f"{step * 1e3:.0f} ms optimizer step ({per_rank} img per rank at {rate:.0f} img/s)")
    values = {"params": params, "grad_bytes": grad_bytes, "seconds": sync, "step_seconds": step}
    if sync > step:  # DDP overlaps its buckets with backward, but cannot hide more than the whole step
        return Row("grad-sync", WARN, f"{detail}: communication would bound the step; fix the interconnect "
                   "or raise trainer.global_batch_size", values)
    return Row("grad-sync", OK, detail, values)


def data_rows(cfg: Config, env: DistEnv, facts: list[Facts], rate: float, rate_source: str) -> list[Row]:
    """The storage's measured read rate over all ranks against what the training consumes."""
    reads = [f.read for f in facts if f.read and f.read["files"]]
    if not reads:
        return []
    files = sum(r["files"] for r in reads)
    nbytes = sum(r["bytes"] for r in reads)
    seconds = max(r["seconds"] for r in reads)  # the ranks read at the same time
    files_s, mb_s = files / seconds, nbytes / 1e6 / seconds
    procs = f"{len(reads)} rank(s) x {cfg.data.workers} thread(s)"
    rows = [Row("data-read", OK, f"{files} files ({human_bytes(nbytes / files)} each) by {procs}, page cache "
                f"dropped: {files_s:,.0f} files/s, {mb_s:,.1f} MB/s", {"files": files, "bytes": nbytes,
                "seconds": seconds, "files_per_s": files_s, "mb_per_s": mb_s})]
    n = facts[0].train_files
    gpus = _gpus(env)
    need = rate * gpus
    read_s, train_s = n / files_s, n / need
    epoch_bytes = n * nbytes / files
    ram = _ram_bytes()
    cache = (f"; the epoch fits in this node's {human_bytes(ram)} of RAM, so later epochs may come from the "
             "page cache" if ram and epoch_bytes < 0.8 * ram else "")
    detail = (f"{n:,} images ({human_bytes(epoch_bytes)}): read in {_dur(read_s)} at the measured rate; "
              f"training at {rate:.0f} img/s x {gpus} GPU(s) = {need:,.0f} img/s ({rate_source}) needs them "
              f"in {_dur(train_s)}")
    values = {"train_files": n, "epoch_bytes": epoch_bytes, "read_seconds": read_s, "train_seconds": train_s,
              "needed_img_s": need, "target_img_s_per_gpu": rate, "gpus": gpus}
    if files_s < need:
        advice = ("fewer processes read than will train: launch under torchrun/srun with the job's ranks to "
                  "measure concurrent reads" if gpus > len(reads) else
                  "copy the dataset to node-local NVMe, or raise data.workers")
        rows.append(Row("data-epoch", WARN, f"{detail}: storage is the bottleneck; {advice}{cache}", values))
    else:
        rows.append(Row("data-epoch", OK, detail, values))
    return rows


def disk_row(cfg: Config, classes: int | None) -> Row:
    """Free space in the run directory against the checkpoints CheckpointManager keeps."""
    params, state = model_bytes(cfg, classes or 1000)
    # One checkpoint: model + EMA state_dicts and AdamW's two fp32 moments per parameter (checkpoint_state()).
    size = state * (2 if cfg.trainer.ema_decay else 1) + 2 * 4 * params
    return checks.disk(run_dir_for(cfg) / "checkpoints", size, cfg.trainer.keep_checkpoints)


def _ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) * 1024  # MemTotal: N kB
    except (OSError, ValueError, IndexError):
        return None


def _dur(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 \
        else f"{seconds / 3600:.1f} h"
