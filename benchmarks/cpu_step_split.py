"""Where the CPU train step of our GC ViT and of timm's goes, side by side in one process: each part's
forward + backward (stem, stages), the whole step with its page faults, and the step's GEMM share by profiler.

    python benchmarks/cpu_step_split.py [--model gcvit_tiny] [--batch 8] [--repeats 7] [--fixed-malloc]

It answers how far the train ratio of `python -m gcvit.bench --compare timm --device cpu` can still move:
the GEMMs (linear layers, convolutions, attention products) cost the same in both models except what drop
path skips, so the ratio is bounded by what the rest of the step (norms, GELU, softmax, copies) costs in each.
--fixed-malloc sets glibc's trim and mmap thresholds to 1 GiB for the process (both models), so that freed
memory is kept instead of being returned to the kernel and faulted in again on the next step.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from gcvit.bench import _build, _steps, environment
from gcvit.engine.metrics import train_flops_per_image
from gcvit.models import canonical_name

IMPLS = ("ours", "timm")
# self-CPU time of these ops is GEMM or convolution work (the profiler's names on CPU)
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::addmm_",
            "aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution_pointwise"}


def fix_malloc() -> None:
    """glibc: never trim the heap top nor mmap a block (1 GiB thresholds): freed pages stay mapped."""
    libc = ctypes.CDLL("libc.so.6")
    for option in (-1, -3):  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
        libc.mallopt(option, 1 << 30)


def parts(model: nn.Module, impl: str) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """The model's stem and stages as (name, module) pairs; the head is the same linear layer in both."""
    stages = [(f"stage{i}", stage) for i, stage in enumerate(model.stages)]
    return [("stem", model._embed if impl == "ours" else model.stem), *stages]


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 1)


Sample = tuple[float, ...]


def _interleaved(measure: Callable[[str], Sample], repeats: int) -> dict[str, list[Sample]]:
    """measure(impl) for both models, order flipped every round; the first round warms up and is dropped."""
    samples: dict[str, list[Sample]] = {impl: [] for impl in IMPLS}
    for r in range(repeats + 1):
        for impl in IMPLS if r % 2 else IMPLS[::-1]:
            sample = measure(impl)
            if r:
                samples[impl].append(sample)
    return samples


def time_parts(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, dict[str, float]]:
    """Forward + backward (a ones gradient) of each part on its own input, the two models interleaved."""
    split = {impl: parts(model, impl) for impl, model in models.items()}
    inputs: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for impl in IMPLS:
            t, inputs[impl] = x, []
            for _, part in split[impl]:
                inputs[impl].append(t)
                t = part(t)
    result: dict[str, dict[str, float]] = {}
    for i, (name, _) in enumerate(split["ours"]):
        samples = _interleaved(partial(_fwd_bwd, split, inputs, i), repeats)
        row = {impl: _median_ms([dt for dt, in samples[impl]]) for impl in IMPLS}
        row["ratio"] = round(row["timm"] / row["ours"], 3)
        result[name] = row
    return result


def _fwd_bwd(split: dict[str, list], inputs: dict[str, list[torch.Tensor]], i: int, impl: str) -> Sample:
    """Seconds of part i's forward + backward on its input (the image itself needs no gradient)."""
    inp = inputs[impl][i].detach().requires_grad_(i > 0)
    t = time.perf_counter()
    out = split[impl][i][1](inp)
    out.backward(torch.ones_like(out))
    return (time.perf_counter() - t,)


def time_steps(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, dict[str, float]]:
    """Whole train steps interleaved: median ms and minor page faults per step."""
    def measure(impl: str) -> tuple[float, float]:
        f0, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        steps[impl]()
        return time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    samples = _interleaved(measure, repeats)
    result = {impl: {"ms": _median_ms([dt for dt, _ in samples[impl]]),
                     "minor_faults": int(statistics.median(df for _, df in samples[impl]))} for impl in IMPLS}
    result["ratio"] = round(result["timm"]["ms"] / result["ours"]["ms"], 3)
    return result


def op_split(step: Callable[[], None], top: int) -> dict:
    """Self-CPU ms of one profiled train step: GEMMs and convolutions against the rest; the top others."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    totals = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    gemm = sum(v for k, v in totals.items() if k in GEMM_OPS)
    others = sorted(((k, v) for k, v in totals.items() if k not in GEMM_OPS), key=lambda kv: -kv[1])
    total = sum(totals.values())
    return {"total_ms": round(total, 1), "gemm_ms": round(gemm, 1), "gemm_share": round(gemm / total, 3),
            "top_other_ms": {k: round(v, 1) for k, v in others[:top]}}


def sgemm_rate(n: int = 2048, iters: int = 5) -> float:
    """GFLOP/s of an n x n x n fp32 matmul with the process's threads: the ceiling the GEMMs work against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    return round(2 * n ** 3 * iters / (time.perf_counter() - t) / 1e9, 1)


def run(args: argparse.Namespace) -> dict:
    name = canonical_name(args.model)
    ns = argparse.Namespace(img_size=args.img_size, channels_last=False, batch=args.batch, precision="fp32",
                            compile=False, steps=["train"])
    device = torch.device("cpu")
    torch.manual_seed(0)
    models = {impl: _build(impl, name, ns, device).train() for impl in IMPLS}
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    steps = {impl: _steps(models[impl], ns, device)["train"] for impl in IMPLS}
    result = {"model": name, "batch": args.batch, "img_size": args.img_size,
              "threads": torch.get_num_threads(), "fixed_malloc": args.fixed_malloc,
              "parts_fwd_bwd_ms": time_parts(models, x, args.repeats),
              "train_step": time_steps(steps, args.repeats)}
    result["profile"] = {impl: op_split(steps[impl], args.top) for impl in IMPLS}
    gemm = {impl: result["profile"][impl]["gemm_ms"] for impl in IMPLS}
    result["gemm_ms_ratio_timm_ours"] = round(gemm["timm"] / gemm["ours"], 3)
    # timm computes every branch, so its counted FLOPs over its GEMM time are the rate its GEMMs reach
    flops = train_flops_per_image(models["ours"], args.img_size, device) * args.batch
    result["timm_gemm_gflop_s"] = round(flops / gemm["timm"] / 1e6, 1)
    result["sgemm_2048_gflop_s"] = sgemm_rate()
    return result


def table(result: dict) -> str:
    """The result as a few readable lines."""
    lines = [f"{'part (fwd+bwd)':16s} {'ours ms':>8s} {'timm ms':>8s} {'timm/ours':>9s}"]
    for name, row in result["parts_fwd_bwd_ms"].items():
        lines.append(f"{name:16s} {row['ours']:8.1f} {row['timm']:8.1f} {row['ratio']:9.3f}")
    step = result["train_step"]
    lines.append(f"{'train step':16s} {step['ours']['ms']:8.1f} {step['timm']['ms']:8.1f} "
                 f"{step['ratio']:9.3f}   minor page faults per step: ours {step['ours']['minor_faults']}, "
                 f"timm {step['timm']['minor_faults']}")
    prof = result["profile"]
    lines.append("profiled step, GEMMs and convolutions: " + ", ".join(
        f"{impl} {prof[impl]['gemm_ms']} of {prof[impl]['total_ms']} ms ({prof[impl]['gemm_share']:.0%})"
        for impl in IMPLS) + f"; timm's GEMMs at {result['timm_gemm_gflop_s']} GFLOP/s, "
        f"a 2048^3 sgemm at {result['sgemm_2048_gflop_s']}")
    for impl in IMPLS:
        lines.append(f"{impl} top others: " + ", ".join(f"{k.removeprefix('aten::')} {v}"
                                                        for k, v in prof[impl]["top_other_ms"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/cpu_step_split.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gcvit_tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds after one warm-up; medians")
    p.add_argument("--top", type=int, default=8, help="how many non-GEMM ops to list")
    p.add_argument("--fixed-malloc", action="store_true", help="glibc thresholds at 1 GiB (see above)")
    p.add_argument("--json-out", help="also write the result, with the environment, to this JSON file")
    args = p.parse_args(argv)
    if args.fixed_malloc:
        fix_malloc()
    result = run(args)
    print(table(result), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            record = {"benchmark": "cpu_step_split", **environment(torch.device("cpu")), "result": result}
            json.dump(record, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
