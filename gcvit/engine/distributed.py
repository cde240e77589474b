"""Process-group setup from torchrun/SLURM/nothing, small collective helpers, and the exit codes."""
from __future__ import annotations

import datetime
import inspect
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gcvit.config import PROCESS_GROUP_TIMEOUT_S

# Exit codes a launcher acts on (docs/cluster.md, "Exit codes"); any other non-zero code is an error too.
# Saved a checkpoint because it was told to stop (preemption, time limit): requeue as is.
PREEMPTED_EXIT_CODE = 75
# A stall the watchdog pinned on some ranks while the others waited for them: requeue without their nodes.
NODE_FAULT_EXIT_CODE = 76
# A stall of every rank alike inside a collective (a NIC, the network, a GPU fault, NCCL) or of the run
# directory's file system, with no rank to blame: requeue as is, a few times at most.
STALL_EXIT_CODE = 77
# A diagnosed failure that a restart would repeat (divergence, out of memory, a bad checkpoint or data, a
# stall of every rank alike outside collectives): do not requeue; read the one-line error (and RUN_DIR/hang/
# for a stall).
BUG_EXIT_CODE = 70


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on the one process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one member is active."""
        return self.world_size > 1


def _first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM nodelist; scontrol knows every syntax, the regex covers `a[1-3,5],b`."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^,\[]+)(?:\[(\d+))?", nodelist)
    if m is None:
        raise RuntimeError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR yourself")
    return m.group(1) + (m.group(2) or "")


def _launcher_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, else from srun tasks, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        # One srun task per GPU: the rendezvous address is the job's first node, the port derives from
        # the job id so that two jobs sharing a node do not collide.
        env.setdefault("MASTER_ADDR", _first_slurm_host(env.get("SLURM_JOB_NODELIST", "localhost")))
        env.setdefault("MASTER_PORT", str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def node_name() -> str:
    """This process's node as the scheduler names it (SLURMD_NODENAME under srun, which --exclude takes),
    else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def resolve_device(kind: str, local_rank: int = 0) -> torch.device:
    """The torch device for `trainer.device` (auto|cpu|cuda) on this process."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu|auto")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(device_kind: str = "auto", timeout_s: float = PROCESS_GROUP_TIMEOUT_S) -> DistEnv:
    """Join the process group the launcher describes (nccl on CUDA, gloo on CPU); no-op single-process."""
    rank, world_size, local_rank = _launcher_env()
    device = resolve_device(device_kind, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown() -> None:
    """Leave the process group (after a barrier so no rank exits while others still talk)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (in place, returned); identity single-process."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap_ddp(model: nn.Module, device: torch.device, unused: list[str],
             accum: int) -> DistributedDataParallel:
    """The model under DDP as the step uses it; `unused`: parameters no forward reaches, `accum`:
    micro-batches per optimizer step (all but the last run under no_sync)."""
    # torch 2.14 renamed broadcast_buffers (and warns on the old name); earlier releases know only that one
    no_buffer_sync = {"forward_sync_buffers" if "forward_sync_buffers" in
                      inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers": False}
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=bool(unused),
        # Gradients live in the all-reduce buckets: no copy into and out of them, one gradient's memory less.
        gradient_as_bucket_view=True,
        # The same graph every step lets DDP fix its bucket order after the first; no_sync steps and
        # unused parameters break that promise.
        static_graph=not unused and accum == 1,
        # The only buffers are constants set at build time (persistent=False): the rel-pos indices and the
        # drop path keep probabilities: nothing to broadcast before every forward.
        **no_buffer_sync)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    if not _active():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
