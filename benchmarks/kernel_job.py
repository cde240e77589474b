"""One process of the GPU kit's kernel benchmark (benchmarks/kernel_candidates.py starts it): for each run it
is given, builds the model (ours with the run's attention and norm, or timm's), checks ours against the math
form, compiles as asked, times bf16 train steps and, where asked, lists the top kernels. Each run's result is
printed as one `RESULT {json}` line the moment it is known, so a crash loses only the run in progress.

    python benchmarks/kernel_job.py --spec JSON     # the spec: see kernel_candidates.job_spec()
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gcvit.engine.compile import compile_model
from gcvit.engine.metrics import peak_flops
from gcvit.models import canonical_name, create_model
from gcvit.variants import VARIANTS

# The gate: ours against the math form with fp32 LayerNorm on the same weights. fp32 (TF32 off): logits and
# every gradient within these fractions of the reference's largest value; bf16 logits within 5% (as the GPU
# tier's bf16 test).
GATE_TOL = {"logits": 1e-3, "grads": 1e-2, "bf16_logits": 5e-2}
GATE_BATCH = 2


def emit(row: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(row), flush=True)


class Bench:
    """The models of this process (built once, ours switched between kernels) and their timed steps."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.device = torch.device(spec["device"])
        self.models: dict[str, nn.Module] = {}
        self.nets: dict[str, nn.Module] = {}  # what the step calls (compiled), per impl
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.peak = peak_flops(self.device, "bf16")
        self.gates: dict[tuple[str, str], dict[str, float] | Exception] = {}
        # a dry run proves the code path on CPU: dynamo and AOTAutograd, not inductor's code generation
        self.backend = "aot_eager" if spec["dry_run"] else "inductor"

    def model(self, impl: str) -> nn.Module:
        if impl not in self.models:
            s = self.spec
            torch.manual_seed(0)
            dpr = VARIANTS[canonical_name(s["model"])]["drop_path"]  # the published rate, as gcvit.bench
            shape = {"img_size": s["img_size"], "drop_path_rate": dpr, **s["overrides"]}
            if impl == "timm":
                import timm
                from timm.models.gcvit import GlobalContextVit
                # timm's factory fixes the variant's depths: an override builds its class with our shape
                v = VARIANTS[canonical_name(s["model"])]
                model = GlobalContextVit(embed_dim=v["dim"], num_heads=v["num_heads"],
                                         mlp_ratio=v["mlp_ratio"], **{"depths": v["depths"], **shape}) \
                    if s["overrides"] else \
                    timm.create_model(s["model"], pretrained=False, **shape)
            else:
                model = create_model(s["model"], **shape)
            self.models[impl] = model.to(self.device).train()
            # the trainer's optimizer: torch's fused AdamW, on CPU as on CUDA
            self.optimizers[impl] = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                                                      fused=True)
        return self.models[impl]

    def net(self, impl: str, how: str) -> nn.Module:
        """The model as the step calls it: compiled as the trainer does (compile_model), timm's whole."""
        if impl not in self.nets:
            model = self.model(impl)
            if how == "off":
                self.nets[impl] = model
            elif impl == "timm":
                self.nets[impl] = torch.compile(model, mode=None if self.spec["mode"] == "default" else
                                                self.spec["mode"], backend=self.backend)
            else:
                self.nets[impl] = compile_model(model, model, how, self.spec["mode"], backend=self.backend)
        return self.nets[impl]

    def step_fn(self, impl: str, how: str, batch: int) -> Callable[[], None]:
        """One train step (bf16 autocast forward, backward, fused AdamW) on a fixed random batch."""
        net, opt = self.net(impl, how), self.optimizers[impl]
        g = torch.Generator().manual_seed(batch)
        size = self.spec["img_size"]
        x = torch.randn(batch, 3, size, size, generator=g).to(self.device).contiguous(
            memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (batch,), generator=g).to(self.device)

        def step() -> None:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step_times(self, step: Callable[[], None], n: int) -> list[float]:
        """Seconds per step: CUDA events around each step, or the host clock on CPU."""
        times = []
        for _ in range(n):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
        return times

    def gate(self, attention: str, norm: str) -> dict[str, float]:
        """ours with (attention, norm) against the math form with fp32 LayerNorm, same weights and batch:
        relative max errors of the logits and of every gradient (fp32, TF32 off) and of bf16 logits."""
        model = self.model("ours")
        g = torch.Generator().manual_seed(1)
        size = self.spec["img_size"]
        x = torch.randn(GATE_BATCH, 3, size, size, generator=g).to(self.device)
        y = torch.randint(0, 1000, (GATE_BATCH,), generator=g).to(self.device)
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        model.eval()  # no drop path: both passes compute the same function
        try:
            model.set_kernels(attention="math", norm="fp32")
            ref = _logits_and_grads(model, x, y, None)
            model.set_kernels(attention=attention, norm=norm)
            got = _logits_and_grads(model, x, y, None)
            low = _logits_and_grads(model, x, y, torch.bfloat16)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            model.train()
            model.zero_grad(set_to_none=True)
        errors = {"logits": _rel(got[0], ref[0]), "bf16_logits": _rel(low[0], ref[0]),
                  "grads": max(_rel(a, b) for a, b in zip(got[1], ref[1]) if b.abs().max() > 0)}
        bad = {k: v for k, v in errors.items() if not v <= GATE_TOL[k]}  # NaN fails too
        if bad:
            raise AssertionError("gate: differs from the math form: " + ", ".join(
                f"{k} {v:.1e} > {GATE_TOL[k]:.0e}" for k, v in bad.items()))
        return {k: float(f"{v:.2e}") for k, v in errors.items()}

    def run(self, r: dict[str, Any]) -> dict[str, Any]:
        """One row: gate (ours, when asked), then warm-up, timed steps, memory, MFU, compile time, kernels."""
        row: dict[str, Any] = {}
        if r["impl"] == "ours":
            if r.get("gate"):
                key = (r["attention"], r["norm"])
                if key not in self.gates:  # once per candidate: its later runs repeat the verdict
                    try:
                        self.gates[key] = self.gate(*key)
                    except Exception as e:  # noqa: BLE001 - reported as this candidate's failure
                        self.gates[key] = e
                if isinstance(self.gates[key], Exception):
                    raise self.gates[key]
                row["gate"] = self.gates[key]
            self.model("ours").set_kernels(attention=r["attention"], norm=r["norm"])
        step = self.step_fn(r["impl"], r["compile"], r["batch"])
        counters = torch._dynamo.utils.counters["inductor"]
        hits, misses = counters["fxgraph_cache_hit"], counters["fxgraph_cache_miss"]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        t = time.perf_counter()
        step()  # compiles, when compiled (for a new batch size: recompiles)
        self.sync()
        first = time.perf_counter() - t
        for _ in range(self.spec["warmup"]):
            step()
        self.sync()
        step_s = statistics.median(self.step_times(step, self.spec["steps"]))
        img_s = r["batch"] / step_s
        flops = self.spec["flops_per_image"]
        row.update(img_s=round(img_s, 1), step_ms=round(step_s * 1e3, 2), first_step_s=round(first, 2),
                   mfu=round(img_s * flops / self.peak, 4) if self.peak and flops else None)
        if self.device.type == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        if r["compile"] != "off":
            row["compile_s"] = round(max(first - step_s, 0.0), 1)
            row["cache"] = {"hits": counters["fxgraph_cache_hit"] - hits,
                            "compiled": counters["fxgraph_cache_miss"] - misses}
        if r.get("profile"):
            row["kernels"] = self.kernels(step)
        return row

    def kernels(self, step: Callable[[], None]) -> list[dict[str, Any]]:
        """The top kernels of two steps by their own device time (CPU ops on a CPU run): ms per step and
        share of the total."""
        cuda = self.device.type == "cuda"
        activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
        with torch.profiler.profile(activities=[activity]) as prof:
            for _ in range(2):
                step()
            self.sync()
        field = "self_device_time_total" if cuda else "self_cpu_time_total"
        events = [(e.key, getattr(e, field)) for e in prof.key_averages()]
        events = [(k, us) for k, us in events if us > 0]
        total = sum(us for _, us in events) or 1.0
        top = sorted(events, key=lambda e: -e[1])[:self.spec["top"]]
        return [{"name": k[:120], "ms_per_step": round(us / 2e3, 3), "share": round(us / total, 4)}
                for k, us in top]


def _logits_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      dtype: torch.dtype | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(x).float()
    F.cross_entropy(logits, y).backward()
    grads = [p.grad.detach().float().clone() for p in model.parameters() if p.grad is not None]
    return logits.detach(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|, in fp64."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _device_broken(device: torch.device) -> bool:
    """Whether a CUDA error left the context unusable (then only a new process can go on)."""
    if device.type != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
        return False
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", required=True, help="the job as JSON (kernel_candidates.job_spec())")
    spec = json.loads(p.parse_args().spec)
    if spec["device"] == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer (gcvit.engine.runtime) runs
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # each batch size its own static graphs (a second size would otherwise compile a dynamic batch)
    torch._dynamo.config.automatic_dynamic_shapes = False
    bench = Bench(spec)
    for r in spec["runs"]:
        try:
            emit({"id": r["id"], "status": "ok", **bench.run(r)})
        except Exception as e:  # noqa: BLE001 - a failing candidate is reported, the others still run
            first = (str(e).strip().splitlines() or [""])[0][:300]
            emit({"id": r["id"], "status": "failed", "error": f"{type(e).__name__}: {first}"})
            if _device_broken(bench.device):
                return 3  # the driver starts a new process for the runs left
    return 0


if __name__ == "__main__":
    sys.exit(main())
