"""One process of the GPU kit's kernel benchmark (benchmarks/kernel_candidates.py starts it): for each run it
is given, builds the model (ours with the run's attention, norm and flex kernel options, or timm's), checks
ours against the math form, compiles as asked, then either times bf16 train steps (and, where asked, lists
the top kernels) or, for a warm-up run, only compiles: two steps, the compile cache filled for a later
process. Each run's result is printed as one `RESULT {json}` line the moment it is known, so a crash loses
only the run in progress.

    python benchmarks/kernel_job.py --spec JSON     # the spec: see kernel_candidates.Planner.process()
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
from gcvit.engine.mfu import peak_flops
from gcvit.models import attention_flex, canonical_name, create_model
from gcvit.variants import VARIANTS

# The gate: ours against the math form with fp32 LayerNorm on the same weights. fp32 (TF32 off): logits and
# every gradient within these fractions of the reference's largest value; bf16 logits within 5% (as the GPU
# tier's bf16 test).
GATE_TOL = {"logits": 1e-3, "grads": 1e-2, "bf16_logits": 5e-2}
GATE_BATCH = 2
MASK_BLOCK = attention_flex.MASK_BLOCK  # the model's own, for every run that sets no mask_block
# Graphs one compiled function may keep in this process: the eager flex kernel meets one per stage shape,
# batch size and dtype (gate and timing) of a configuration (dynamo is reset between configurations)
RECOMPILES = 256


def emit(row: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(row), flush=True)


def logits_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     dtype: torch.dtype | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """fp32 logits and every parameter's gradient (fp32, by name) of one cross-entropy step, under autocast to
    `dtype` (None: off). The kit's gate and the GPU tier's model test compare two kernels' with it."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(x).float()
    F.cross_entropy(logits, y).backward()
    return logits.detach(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                             if p.grad is not None}


class Bench:
    """The configuration this process runs now (model, what the step calls, optimizer), rebuilt from the same
    seed when a run asks for another one, and its timed steps."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.device = torch.device(spec["device"])
        self.key: tuple[Any, ...] | None = None
        self.model: nn.Module | None = None
        self.net: nn.Module | None = None  # what the step calls (compiled or not)
        self.optimizer: torch.optim.Optimizer | None = None
        self.peak = peak_flops(self.device, "bf16")
        self.gates: dict[tuple[str, str, str], dict[str, float] | Exception] = {}
        # a dry run proves the code path on CPU: dynamo and AOTAutograd, not inductor's code generation
        self.backend = "aot_eager" if spec["dry_run"] else "inductor"

    def configure(self, r: dict[str, Any]) -> None:
        """The run's configuration: a new one starts from a fresh model (same seed, so the same weights) and
        a reset dynamo, so each compiles (from the cache, when warm) as a new process would."""
        options = dict(r.get("kernel_options") or {})
        key = (r["impl"], r["compile"], r["attention"], r["norm"], json.dumps(options, sort_keys=True))
        if key == self.key:
            return
        self.key = self.model = self.net = self.optimizer = None
        torch._dynamo.reset()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        # the flex mask's block and kernel's options (model.attention=flex on CUDA), read when the model runs
        attention_flex.MASK_BLOCK = options.pop("mask_block", MASK_BLOCK)
        attention_flex.KERNEL_OPTIONS.clear()
        attention_flex.KERNEL_OPTIONS.update(options)
        model = self.build(r["impl"])
        if r["impl"] == "ours":
            model.set_kernels(attention=r["attention"], norm=r["norm"])
        # the trainer's optimizer: torch's fused AdamW, on CPU as on CUDA
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
        mode = self.spec["mode"]
        if r["compile"] == "off":
            self.net = model
        elif r["impl"] == "timm":  # timm compiled whole, as its users compile it
            self.net = torch.compile(model, mode=None if mode == "default" else mode, backend=self.backend)
        else:  # ours as the trainer compiles it
            self.net = compile_model(model, model, r["compile"], mode, backend=self.backend)
        self.model, self.key = model, key

    def build(self, impl: str) -> nn.Module:
        s = self.spec
        torch.manual_seed(0)
        dpr = VARIANTS[canonical_name(s["model"])]["drop_path"]  # the published rate, as gcvit.bench
        shape = {"img_size": s["img_size"], "drop_path_rate": dpr, **s["overrides"]}
        if impl == "timm":
            import timm
            from timm.models.gcvit import GlobalContextVit
            # timm's factory fixes the variant's depths: an override builds its class with our shape
            v = VARIANTS[canonical_name(s["model"])]
            model = GlobalContextVit(embed_dim=v["dim"], num_heads=v["num_heads"], mlp_ratio=v["mlp_ratio"],
                                     **{"depths": v["depths"], **shape}) if s["overrides"] else \
                timm.create_model(s["model"], pretrained=False, **shape)
        else:
            model = create_model(s["model"], **shape)
        return model.to(self.device).train()

    def step_fn(self, batch: int) -> Callable[[], None]:
        """One train step (bf16 autocast forward, backward, fused AdamW) on a fixed random batch."""
        net, opt = self.net, self.optimizer
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

    def timed(self, step: Callable[[], None]) -> float:
        """Seconds of one step, host clock, synchronized (the compiling first steps)."""
        t = time.perf_counter()
        step()
        self.sync()
        return time.perf_counter() - t

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
                times.append(self.timed(step))
        return times

    def gate(self, r: dict[str, Any]) -> dict[str, float]:
        """The run's (attention, norm, options) against the math form with fp32 LayerNorm, same weights and
        batch: relative max errors of the logits and of every gradient (fp32, TF32 off) and of bf16 logits.
        Once per configuration: its later runs repeat the verdict."""
        key = (r["attention"], r["norm"], json.dumps(r.get("kernel_options") or {}, sort_keys=True))
        if key not in self.gates:
            try:
                self.gates[key] = self._gate(r["attention"], r["norm"])
            except Exception as e:  # noqa: BLE001 - reported as this candidate's failure
                self.gates[key] = e
        if isinstance(self.gates[key], Exception):
            raise self.gates[key]
        return self.gates[key]

    def _gate(self, attention: str, norm: str) -> dict[str, float]:
        model = self.model
        g = torch.Generator().manual_seed(1)
        size = self.spec["img_size"]
        x = torch.randn(GATE_BATCH, 3, size, size, generator=g).to(self.device)
        y = torch.randint(0, 1000, (GATE_BATCH,), generator=g).to(self.device)
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        model.eval()  # no drop path: both passes compute the same function
        try:
            model.set_kernels(attention="math", norm="fp32")
            ref = logits_and_grads(model, x, y, None)
            model.set_kernels(attention=attention, norm=norm)
            got = logits_and_grads(model, x, y, None)
            low = logits_and_grads(model, x, y, torch.bfloat16)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            model.set_kernels(attention=attention, norm=norm)
            model.train()
            model.zero_grad(set_to_none=True)
        errors = {"logits": _rel(got[0], ref[0]), "bf16_logits": _rel(low[0], ref[0]),
                  "grads": max(_rel(got[1][n], b) for n, b in ref[1].items() if b.abs().max() > 0)}
        bad = {k: v for k, v in errors.items() if not v <= GATE_TOL[k]}  # NaN fails too
        if bad:
            raise AssertionError("gate: differs from the math form: " + ", ".join(
                f"{k} {v:.1e} > {GATE_TOL[k]:.0e}" for k, v in bad.items()))
        return {k: float(f"{v:.2e}") for k, v in errors.items()}

    def run(self, r: dict[str, Any]) -> dict[str, Any]:
        """One row: gate (ours, when asked), then warm-up, timed steps, memory, MFU, compile time, kernels;
        a warm-up run (`warm`) only compiles: its compile time is its first step less its second."""
        self.configure(r)
        row: dict[str, Any] = {}
        if r.get("gate"):
            row["gate"] = self.gate(r)
        step = self.step_fn(r["batch"])
        counters = torch._dynamo.utils.counters["inductor"]
        hits, misses = counters["fxgraph_cache_hit"], counters["fxgraph_cache_miss"]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        first = self.timed(step)  # compiles, when compiled (for a new batch size: recompiles)
        cache = {"hits": counters["fxgraph_cache_hit"] - hits,
                 "compiled": counters["fxgraph_cache_miss"] - misses}
        if r.get("warm"):
            row.update(compile_s=round(max(first - self.timed(step), 0.0), 1), cache=cache)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the memory back to the timing process beside this one
            return row
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
            row.update(compile_s=round(max(first - step_s, 0.0), 1), cache=cache)
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
    p.add_argument("--spec", required=True, help="the job as JSON (kernel_candidates.Planner.process())")
    spec = json.loads(p.parse_args().spec)
    if spec["device"] == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer (gcvit.engine.runtime) runs
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # each batch size its own static graphs (a second size would otherwise compile a dynamic batch)
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILES)
    bench = Bench(spec)
    for r in spec["runs"]:
        for attempt in (1, 2):
            try:
                emit({"id": r["id"], "status": "ok", **bench.run(r)})
                break
            except Exception as e:  # noqa: BLE001 - a failing candidate is reported, the others still run
                bench.key = None  # its half-built configuration is not reused
                if attempt == 1 and isinstance(e, torch.OutOfMemoryError):
                    # the kit's compile workers share the GPU: once, after they had time to let go of it
                    time.sleep(5)
                    continue
                first = (str(e).strip().splitlines() or [""])[0][:300]
                emit({"id": r["id"], "status": "failed", "error": f"{type(e).__name__}: {first}"})
                if _device_broken(bench.device):
                    return 3  # the driver starts a new process for the runs left
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
