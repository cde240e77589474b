"""Throughput of our GC ViT against timm's, interleaved in one process: train step and inference."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gcvit.engine.mfu import peak_flops, train_flops_per_image
from gcvit.engine.provenance import environment
from gcvit.engine.runtime import synchronize
from gcvit.models import canonical_name, create_model
from gcvit.variants import VARIANTS

IN1K_TRAIN_IMAGES = 1_281_167
IN1K_EPOCHS = 310  # the recipe's 300 cosine epochs + 10 cooldown epochs


def _build(impl: str, name: str, args: argparse.Namespace, device: torch.device) -> nn.Module:
    """One model with the variant's published drop-path rate, on `device`, channels_last if asked."""
    dpr = VARIANTS[name]["drop_path"]
    if impl == "timm":
        import timm
        model = timm.create_model(name, pretrained=False, img_size=args.img_size, drop_path_rate=dpr)
    else:
        model = create_model(name, img_size=args.img_size, drop_path_rate=dpr)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _steps(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Callable[[], None]]:
    """Closures running one train step (fwd + bwd + fused AdamW) and one inference pass."""
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    # the trainer's optimizer (gcvit/engine/optim.py): torch's fused AdamW, on CPU as on CUDA
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
           else contextlib.nullcontext())
    net = torch.compile(model) if args.compile else model

    def train() -> None:
        model.train()
        with amp:
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer() -> None:
        model.eval()
        with torch.inference_mode(), amp:
            net(x)

    return {k: fn for k, fn in (("train", train), ("infer", infer)) if k in args.steps}


def _time(fn: Callable[[], None], iters: int, device: torch.device) -> float:
    synchronize(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - t) / iters


def run(args: argparse.Namespace) -> dict:
    """Warm up both, then alternate them (order flipped every repeat); medians of img/s and ratios."""
    device = torch.device(args.device)
    name = canonical_name(args.model)
    impls = ["ours", *args.compare]
    torch.manual_seed(0)
    models = {impl: _build(impl, name, args, device) for impl in impls}
    steps = {impl: _steps(models[impl], args, device) for impl in impls}
    peak_mem: dict[str, float] = {}
    for impl in impls:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for fn in steps[impl].values():
            for _ in range(args.warmup):
                fn()
        if device.type == "cuda":  # both models' weights and optimizer states are resident: the same for both
            peak_mem[impl] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    samples: dict[str, dict[str, list[float]]] = {i: {k: [] for k in args.steps} for i in impls}
    for r in range(args.repeats):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            for kind, fn in steps[impl].items():
                samples[impl][kind].append(args.batch / _time(fn, args.iters, device))
    result: dict = dict(model=name, device=str(device), batch=args.batch, img_size=args.img_size,
                        precision=args.precision, compile=args.compile, channels_last=args.channels_last,
                        threads=torch.get_num_threads(), repeats=args.repeats, iters=args.iters)
    for impl in impls:
        result[impl] = {f"{k}_img_s": round(statistics.median(v), 2) for k, v in samples[impl].items()}
        if impl in peak_mem:
            result[impl]["peak_mem_gib"] = peak_mem[impl]
    flops = train_flops_per_image(models["ours"], args.img_size, device)
    peak = peak_flops(device, args.precision)
    result["ours"]["train_gflop_per_image"] = round(flops / 1e9, 2)
    if "train" in args.steps:
        rate = result["ours"]["train_img_s"]
        result["ours"]["mfu"] = round(rate * flops / peak, 4) if peak else None
        # the in1k recipe on 8 such devices at this step rate (perfect scaling, the data keeping up)
        result["in1k_hours_on_8"] = round(IN1K_EPOCHS * IN1K_TRAIN_IMAGES / (8 * rate) / 3600, 1)
    for other in args.compare:
        result[f"ratio_ours_{other}"] = {
            k: round(statistics.median(a / b for a, b in zip(samples["ours"][k], samples[other][k])), 3)
            for k in args.steps}
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: prints one JSON line."""
    p = argparse.ArgumentParser(prog="python -m gcvit.bench", description=__doc__)
    p.add_argument("--model", default="gcvit_tiny")
    p.add_argument("--compare", nargs="*", default=[], choices=["timm"], help="implementations to time too")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--channels-last", action="store_true", help="channels_last inputs and weights for both")
    p.add_argument("--steps", nargs="+", choices=["train", "infer"], default=["train", "infer"],
                   help="what to time: a train step (fwd + bwd + AdamW) and/or an inference pass")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each step first")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds; medians are reported")
    p.add_argument("--iters", type=int, default=2, help="calls per timed sample")
    p.add_argument("--json-out", help="also write the result, with device and versions, to this JSON file")
    args = p.parse_args(argv)
    try:
        result = run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    if args.json_out:
        record = {"benchmark": "gcvit.bench", "argv": sys.argv[1:] if argv is None else argv,
                  **environment(torch.device(args.device)), "result": result}
        with open(args.json_out, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
