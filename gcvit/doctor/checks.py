"""The checks that look at one process's node, each returning Rows: software, GPUs, DALI, the dataset's
storage, the run directory's disk, W&B and the launcher (ranks.py runs them on every rank; a new check is
one more function here)."""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from gcvit.engine.wandb_logger import wandb_unreachable
from gcvit_data.index import DataError, Index
from gcvit_data.readers import load_index

OK, WARN, FAIL = "OK", "WARN", "FAIL"
SEVERITY = {OK: 0, WARN: 1, FAIL: 2}


@dataclass
class Row:
    """One line of the doctor's table."""

    check: str  # short name of what was checked
    status: str  # OK | WARN (works, but slower or riskier than it should) | FAIL (a blocker)
    detail: str  # what was found, and for WARN/FAIL what to do
    values: dict[str, Any] = field(default_factory=dict)  # the measured figures, for --json


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disks and networks count)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    proc = Path("/proc/driver/nvidia/version")
    return proc.read_text().split("Kernel Module")[1].split()[0] if proc.is_file() else None


def software() -> list[Row]:
    """torch and the CUDA stack it was built with, and the driver that runs it."""
    cuda, cudnn = torch.version.cuda, torch.backends.cudnn.version()
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if cuda and torch.distributed.is_nccl_available() \
        else None
    driver = _driver_version()
    values = {"torch": torch.__version__, "cuda": cuda, "cudnn": cudnn, "nccl": nccl, "driver": driver}
    rows = [Row("torch", OK, f"torch {torch.__version__}", {"torch": torch.__version__})]
    stack = (f"CUDA {cuda or 'none (CPU build)'}, cuDNN {cudnn or '-'}, NCCL {nccl or '-'}, "
             f"driver {driver or '-'}")
    if cuda and driver and not torch.cuda.is_available():
        rows.append(Row("cuda", FAIL, f"{stack}: the driver is present but torch cannot use it; install a "
                        f"driver that supports CUDA {cuda} or a torch built for an older CUDA", values))
    else:
        rows.append(Row("cuda", OK, stack, values))
    return rows


def gpus(device: str, precision: str) -> Row:
    """The visible GPUs: name, memory, bf16 support; a blocker when the config needs what is missing."""
    if not torch.cuda.is_available():
        status = FAIL if device == "cuda" else WARN
        todo = ("set trainer.device=cpu|auto or run on a GPU node" if device == "cuda"
                else "training runs on CPU")
        return Row("gpus", status, f"no CUDA device visible: {todo}", {"count": 0})
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    bf16 = all(p.major >= 8 for p in props)  # bf16 tensor cores start with Ampere (sm80)
    names = sorted({p.name for p in props})
    mem = min(p.total_memory for p in props) / 2**30
    detail = (f"{len(props)} x {', '.join(names)}, {mem:.0f} GiB, sm{props[0].major}{props[0].minor}, "
              f"bf16 {'yes' if bf16 else 'no'}")
    values = {"count": len(props), "names": names, "memory_gib": round(mem, 1), "bf16": bf16}
    if precision == "bf16" and not bf16:
        return Row("gpus", FAIL, f"{detail}: trainer.precision=bf16 needs sm80+; use trainer.precision=fp16",
                   values)
    if len(names) > 1:
        return Row("gpus", WARN, f"{detail}: mixed models; the slowest paces every step", values)
    return Row("gpus", OK, detail, values)


def dali_decode(jpeg: Path | None) -> Row:
    """DALI imports and decodes one real JPEG (nvJPEG `mixed` decode on a GPU, the CPU decoder otherwise)."""
    try:
        import nvidia.dali as dali
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as e:
        return Row("dali", WARN, f"DALI is not importable ({e}); data.loader=dali needs pip install -e "
                   "'.[dali]' (data.loader=torch works without it)")
    with tempfile.TemporaryDirectory() as tmp:
        if jpeg is None:  # no dataset to take one from: a real JPEG encoded here
            jpeg = Path(tmp) / "probe.jpg"
            Image.new("RGB", (67, 45), (200, 30, 90)).save(jpeg, quality=90)
        gpu = torch.cuda.is_available()

        @pipeline_def(batch_size=1, num_threads=1, device_id=torch.cuda.current_device() if gpu else None)
        def probe():
            encoded, _ = fn.readers.file(files=[str(jpeg)])
            return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)

        try:
            pipe = probe()
            pipe.build()
            (out,) = pipe.run()
            shape = tuple((out.as_cpu() if gpu else out).as_array().shape[1:])
        except Exception as e:  # DALI raises plain RuntimeErrors for missing CUDA libraries or bad files
            return Row("dali", FAIL, f"DALI {dali.__version__} cannot decode {jpeg}: "
                       f"{str(e).strip().splitlines()[0]}")
        width, height = Image.open(jpeg).size
    if shape != (height, width, 3):
        return Row("dali", FAIL, f"DALI decoded {jpeg} as {shape}, expected {(height, width, 3)}")
    where = "on the GPU (nvJPEG, mixed)" if gpu else "on the CPU; GPU decode skipped: no GPU"
    return Row("dali", OK, f"DALI {dali.__version__}: decoded a {width}x{height} JPEG {where}",
               {"version": dali.__version__, "gpu_decode": gpu})


def dataset_index(root: str | None, index_cache: str | None,
                  index_dir: str | None) -> tuple[Row, Index | None]:
    """The train index loads (from index_dir, the cache or a scan); the val split is looked for too."""
    if not root:
        return Row("data-index", FAIL, "data.root is unset; pass data.root=ROOT (ROOT/train/<wnid>/*.JPEG, "
                   "ROOT/val/<wnid>/*.JPEG)"), None
    start = time.perf_counter()
    try:
        train = load_index(root, "train", index_cache=index_cache, index_dir=index_dir)
        val = len(load_index(root, "val", index_cache=index_cache, index_dir=index_dir))
    except DataError as e:
        return Row("data-index", FAIL, str(e.code).removeprefix("data error: ")), None
    took = time.perf_counter() - start
    values = {"root": str(root), "train_files": len(train), "val_files": val, "classes": len(train.classes),
              "seconds": round(took, 2)}
    return Row("data-index", OK, f"{root}: {len(train):,} train / {val:,} val images, {len(train.classes)} "
               f"classes (index in {took:.1f} s)", values), train


def _read_cold(path: Path) -> int:
    """Bytes of `path`, read after asking the kernel to drop its cached pages (a first-epoch read)."""
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        n = 0
        while chunk := f.read(1 << 20):
            n += len(chunk)
    return n


def timed_read(index: Index, files: int, threads: int, seed: int, budget_s: float = 20.0) -> dict[str, float]:
    """Read a random sample of `files` files with `threads` threads (as the loader does) for at most
    `budget_s` seconds; returns files, bytes and seconds."""
    sample = random.Random(seed).sample(range(len(index)), min(files, len(index)))
    if not index.by_path:  # read as training reads it: one pread per sample from open shards
        index.reader.drop_page_cache()
        read = lambda i: len(index.encoded(i))  # noqa: E731
    else:
        read = lambda i: _read_cold(index.path(i))  # noqa: E731
    start = time.perf_counter()
    done, nbytes = 0, 0
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for n in pool.map(read, sample):
            done, nbytes = done + 1, nbytes + n
            if time.perf_counter() - start > budget_s:
                pool.shutdown(cancel_futures=True)
                break
    return {"files": done, "bytes": nbytes, "seconds": time.perf_counter() - start}


def disk(run_dir: Path, checkpoint_bytes: int, keep: int) -> Row:
    """Free space where the checkpoints go against keep step-tagged files + `best` + one being written."""
    where = run_dir
    while not where.exists():  # the run dir is created by the first run: measure the filesystem it goes on
        where = where.parent
    need = (keep + 2) * checkpoint_bytes
    free = shutil.disk_usage(where).free
    detail = (f"{run_dir}: {human_bytes(free)} free; checkpoints need {human_bytes(need)} ({keep} kept + "
              f"best + one being written, {human_bytes(checkpoint_bytes)} each)")
    values = {"run_dir": str(run_dir), "free_bytes": free, "checkpoint_bytes": checkpoint_bytes,
              "needed_bytes": need}
    if not os.access(where, os.W_OK):
        return Row("disk", FAIL, f"{where} is not writable: set trainer.output_dir to a writable directory",
                   values)
    if free < need:
        return Row("disk", FAIL, f"{detail}: free space or lower trainer.keep_checkpoints", values)
    if free < 2 * need:
        return Row("disk", WARN, f"{detail}: little headroom for logs, W&B files and other jobs", values)
    return Row("disk", OK, detail, values)


def wandb_row(mode: str) -> Row:
    """W&B mode and, when online, whether its server answers (the trainer falls back to offline if not)."""
    if mode == "disabled":
        return Row("wandb", OK, "logger.wandb.mode=disabled: no W&B logging", {"mode": mode})
    try:
        import wandb
    except ImportError:
        return Row("wandb", FAIL, f"logger.wandb.mode={mode} but wandb is not installed: pip install wandb, "
                   "or logger.wandb.mode=disabled", {"mode": mode})
    if mode == "offline":
        return Row("wandb", OK, f"wandb {wandb.__version__} offline: runs write RUN_DIR/wandb; upload later "
                   "with `wandb sync`", {"mode": mode})
    problem = wandb_unreachable(timeout=3.0)
    if problem:
        return Row("wandb", WARN, f"online, but {problem}: the run would fall back to offline; set "
                   "logger.wandb.mode=offline on nodes without internet", {"mode": mode, "reachable": False})
    key = os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").is_file()
    if not key:
        return Row("wandb", WARN, "online and the server answers, but no WANDB_API_KEY or ~/.netrc: run "
                   "`wandb login` first", {"mode": mode, "reachable": True})
    return Row("wandb", OK, f"wandb {wandb.__version__} online, server reachable", {"mode": mode,
               "reachable": True})


def launcher(rank: int, world_size: int, local_rank: int) -> Row:
    """What launched this process (torchrun, srun or nothing) and whether ranks and GPUs line up."""
    env = os.environ
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_NNODES", "SLURM_JOB_NODELIST")
    values = {k: env[k] for k in keys if k in env}
    if "RANK" in env and "WORLD_SIZE" in env:
        kind = "torchrun"
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        kind = "srun"
    else:
        kind = "plain"
    slurm = f", SLURM job {env['SLURM_JOB_ID']} on {env.get('SLURM_JOB_NODELIST', '?')}" \
        if "SLURM_JOB_ID" in env else ""
    rdzv = f", rendezvous {env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}" if world_size > 1 else ""
    detail = f"{kind}: rank {rank} of {world_size}, local rank {local_rank}{rdzv}{slurm}"
    values.update(kind=kind, rank=rank, world_size=world_size)
    if kind == "plain" and int(env.get("SLURM_NTASKS", "1")) > 1:
        return Row("launcher", FAIL, f"{detail}: SLURM_NTASKS={env['SLURM_NTASKS']} but SLURM_PROCID is "
                   "unset; start the tasks with srun", values)
    # SLURM writes e.g. "8(x2)": 8 tasks on each of 2 nodes
    per_node = env.get("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", ""))
    local = int(re.match(r"\d*", per_node).group() or 1)
    if torch.cuda.is_available() and local > torch.cuda.device_count():
        return Row("launcher", FAIL, f"{detail}: {local} ranks on this node but {torch.cuda.device_count()} "
                   "GPUs visible; launch one rank per GPU", values)
    if kind == "plain" and torch.cuda.device_count() > 1:
        n = torch.cuda.device_count()
        return Row("launcher", WARN, f"{detail}: {n} GPUs but one process; launch with torchrun "
                   f"--nproc_per_node={n} to check them all", values)
    return Row("launcher", OK, detail, values)


# What launch/nccl_env.sh sets where the user has not: (name, older name, a value that leaves it off).
NCCL_DIAGNOSTICS = (("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE", "0"),
                    ("TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_NCCL_DUMP_ON_TIMEOUT", "0"),
                    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "0"))


def nccl_env(device: str) -> Row:
    """Whether a NCCL hang would leave a flight-recorder dump and end the process (docs/cluster.md)."""
    values = {new: os.environ.get(new, os.environ.get(old)) for new, old, _ in NCCL_DIAGNOSTICS}
    shown = ", ".join(f"{k}={v}" for k, v in values.items() if v is not None) or "none set"
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return Row("nccl-env", OK, f"{shown} (NCCL unused: gloo on CPU)", values)
    # Unset is fine: torch's own defaults keep 2000 entries, dump on a timeout and use async error handling 3.
    off = [new for new, _, none in NCCL_DIAGNOSTICS if values[new] == none]
    if off:
        return Row("nccl-env", WARN, f"{', '.join(off)} set to 0 (off): a NCCL hang would leave no flight-"
                   "recorder dump or hang instead of ending the process; unset them (torch's defaults are "
                   "on)", values)
    unset = "" if None not in values.values() else "; unset: torch's defaults (on)"
    return Row("nccl-env", OK, shown + unset, values)

