"""What connects the ranks of a job, how fast an all-reduce runs over it, and what that costs a training step.

Bus bandwidth follows nccl-tests (doc/PERFORMANCE.md): algbw = bytes / time, busbw = algbw * 2(n-1)/n, the
figure that is comparable across rank counts and with the link speed. The expected figures are what
nccl-tests' all_reduce_perf typically reaches with large messages on such hardware, not the link's peak.
"""
from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

# All-reduce busbw (GB/s) of 8 GPUs behind NVSwitch, by device-name fragment (first match wins).
_NVSWITCH_BUSBW = {"B200": 700.0, "GB200": 700.0, "H200": 450.0, "H100": 450.0, "H800": 180.0, "A100": 230.0,
                   "A800": 160.0, "V100": 130.0}
# PCIe generation -> usable GB/s per direction of an x16 link (about 80% of the raw rate).
_PCIE_GBPS = {3: 12.0, 4: 25.0, 5: 50.0, 6: 100.0}
IB_ROOT = Path("/sys/class/infiniband")


@dataclass
class Interconnect:
    """The fabric a job's all-reduce crosses, as far as this node can tell."""

    kind: str  # e.g. "NVSwitch", "NVLink", "PCIe gen4", "InfiniBand 8x400 Gb/s", "TCP (gloo)"
    expected_busbw: float | None  # GB/s nccl-tests typically reaches over it; None when unknown
    basis: str  # how it was detected and where the expectation comes from


def _run(cmd: list[str]) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def nvlink_topology(matrix: str | None) -> str | None:
    """"NVSwitch" when every GPU pair is NVLink-connected in `nvidia-smi topo -m`'s matrix, "NVLink" when
    some are, None when none is."""
    if not matrix:
        return None
    rows = [ln.split() for ln in matrix.splitlines() if re.match(r"GPU\d+\s", ln)]  # the header is indented
    n = len(rows)
    links = [cell for i, row in enumerate(rows) for j, cell in enumerate(row[1:n + 1]) if i != j]
    nv = [c for c in links if re.fullmatch(r"NV\d+", c)]
    if n > 1 and len(nv) == len(links):
        return "NVSwitch" if n > 2 else "NVLink"
    return "NVLink" if nv else None


def _pcie_gen() -> int | None:
    out = _run(["nvidia-smi", "--query-gpu=pcie.link.gen.max", "--format=csv,noheader"])
    gens = [int(x) for x in (out or "").split() if x.isdigit()]
    return min(gens) if gens else None


def infiniband_ports() -> list[tuple[str, float]]:
    """(device/port, Gb/s) of every ACTIVE InfiniBand/RoCE port under /sys/class/infiniband."""
    ports = []
    for port in sorted(IB_ROOT.glob("*/ports/*")):
        try:
            state = (port / "state").read_text()
            rate = float((port / "rate").read_text().split()[0])  # "400 Gb/sec (4X NDR)"
        except (OSError, ValueError, IndexError):
            continue
        if "ACTIVE" in state:
            ports.append((f"{port.parent.parent.name}/{port.name}", rate))
    return ports


def detect(cuda: bool, nodes: int) -> Interconnect:
    """The fabric of an all-reduce over `nodes` nodes: NVLink/PCIe within one, InfiniBand or TCP across."""
    if not cuda:
        return Interconnect("TCP (gloo)", None, "CPU tensors go through gloo over TCP: no reference figure")
    if nodes > 1:
        ports = infiniband_ports()
        if not ports:
            return Interconnect("TCP sockets", None, f"{IB_ROOT} lists no active port: NCCL falls back to "
                                "TCP, typically a few GB/s; use a node with InfiniBand/RoCE for multi-node")
        total = sum(r for _, r in ports) / 8  # Gb/s -> GB/s; NCCL spreads rings over all rails
        rates = sorted({r for _, r in ports})
        return Interconnect(f"InfiniBand {len(ports)}x{'/'.join(f'{r:g}' for r in rates)} Gb/s",
                            0.9 * total, f"{len(ports)} active ports in {IB_ROOT}, ~90% of their sum")
    name = torch.cuda.get_device_name()
    topo = nvlink_topology(_run(["nvidia-smi", "topo", "-m"]))
    if topo:
        ref = next((v for k, v in _NVSWITCH_BUSBW.items() if k in name), None)
        basis = "nvidia-smi topo -m" + (f"; nccl-tests on 8x {name}" if ref else f"; no reference for {name}")
        return Interconnect(topo, ref if topo == "NVSwitch" else None, basis)
    gen = _pcie_gen()
    if gen in _PCIE_GBPS:
        return Interconnect(f"PCIe gen{gen}", _PCIE_GBPS[gen], "no NVLink in nvidia-smi topo -m; ~80% of x16")
    return Interconnect("PCIe", None, "no NVLink seen and the PCIe generation is unknown")


@dataclass
class AllReduce:
    """One timed all-reduce measurement (identical on every rank)."""

    ranks: int
    megabytes: float  # message size
    rank_seconds: list[float]  # mean time of one all-reduce as each rank saw it
    backend: str

    @property
    def seconds(self) -> float:
        """The collective's time: that of its slowest rank."""
        return max(self.rank_seconds)

    @property
    def algbw(self) -> float:
        """GB/s of payload: bytes / time."""
        return self.megabytes / 1e3 / self.seconds

    @property
    def busbw(self) -> float:
        """GB/s per link, nccl-tests' bus bandwidth: algbw * 2(n-1)/n."""
        return self.algbw * 2 * (self.ranks - 1) / self.ranks


def measure_allreduce(device: torch.device, megabytes: float, iters: int, warmup: int = 3) -> AllReduce:
    """Time `iters` sum all-reduces of an fp32 buffer of `megabytes` MB across the process group."""
    n = dist.get_world_size()
    buf = torch.zeros(int(megabytes * 1e6) // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        dist.all_reduce(buf)
    sync()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(buf)
    sync()
    elapsed = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64, device=device)
    every = [torch.zeros_like(elapsed) for _ in range(n)]
    dist.all_gather(every, elapsed)
    return AllReduce(n, buf.numel() * 4 / 1e6, [float(t.item()) for t in every], dist.get_backend())


def allreduce_seconds(nbytes: float, ranks: int, busbw_gbps: float) -> float:
    """Time of one all-reduce of `nbytes` over `ranks` ranks at bus bandwidth `busbw_gbps` (GB/s)."""
    return nbytes * 2 * (ranks - 1) / ranks / (busbw_gbps * 1e9)
