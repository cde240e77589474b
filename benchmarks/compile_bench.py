"""What compiling a train step costs, cold and warm: ours by blocks and whole, against timm's whole model.

    python benchmarks/compile_bench.py [--model gcvit_xxtiny] [--img-size 64] [--batch 2] [--device cpu]
                                       [--json-out benchmarks/results/cpu-compile-<stamp>.json]

Each candidate runs in a fresh process twice over one new cache directory: the first start compiles (cold),
the second finds inductor's and AOTAutograd's caches filled (warm), as a requeued job does. A start builds the
model (drop path 0, so that steps are deterministic), compiles it, times its first train step (forward,
backward: where compiling happens) and a steady one after it, and compares the compiled step's loss and
gradients with an eager copy's. Compile time = first step - steady step. The table comes last; the JSON
records it with the device, the versions and the commit.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CANDIDATES = {"ours-blocks": ("ours", "blocks"), "ours-model": ("ours", "model"),
              "timm-model": ("timm", "model")}


def _step(net, x, y):
    """A train step's forward and backward; on CUDA under bf16 autocast, as training runs there."""
    import torch
    import torch.nn.functional as F

    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        loss = F.cross_entropy(net(x), y)
    loss.backward()
    return loss.detach()


def start(impl: str, kind: str, args: argparse.Namespace) -> dict:
    """One process's start: build, compile, first and steady step, equality with eager."""
    import torch

    from gcvit.engine.compile import compile_model
    from gcvit.engine.runtime import synchronize
    from gcvit.models import create_model

    device = torch.device(args.device)
    torch.manual_seed(0)
    if impl == "timm":
        import timm
        model = timm.create_model(args.model, pretrained=False, img_size=args.img_size, num_classes=10)
    else:
        model = create_model(args.model, img_size=args.img_size, num_classes=10, drop_path_rate=0.0)
    model = model.to(device).train()
    eager = copy.deepcopy(model)
    net = compile_model(model, model, kind)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.arange(args.batch, device=device) % 10
    times, counters = [], torch._dynamo.utils.counters
    for _ in range(2):
        tic = time.perf_counter()
        loss = _step(net, x, y)
        synchronize(device)
        times.append(time.perf_counter() - tic)
    ref = _step(eager, x, y)  # the compiled model has run two steps' backward: gradients doubled, as here
    ref = _step(eager, x, y)
    grad_err = max(((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-12)).item()
                   for a, b in zip(model.parameters(), eager.parameters()) if b.grad is not None)
    return {"first_step_s": round(times[0], 2), "steady_step_s": round(times[1], 3),
            "compile_s": round(times[0] - times[1], 2), "graphs": counters["stats"]["unique_graphs"],
            "from_cache": counters["inductor"]["fxgraph_cache_hit"],
            "compiled": counters["inductor"]["fxgraph_cache_miss"],
            "loss_diff": abs(loss.item() - ref.item()), "grad_rel_err": grad_err}


def _spawn(name: str, cache: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}
    cmd = [sys.executable, __file__, "--start", name, "--model", args.model, "--img-size", str(args.img_size),
           "--batch", str(args.batch), "--device", args.device]
    tic = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "process_s": round(time.perf_counter() - tic, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gcvit_xxtiny")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--json-out", help="write the results, with device and versions, to this JSON file")
    p.add_argument("--start", choices=list(CANDIDATES), help=argparse.SUPPRESS)  # one start, in a child
    args = p.parse_args(argv)
    if args.start:
        print(json.dumps(start(*CANDIDATES[args.start], args)))
        return 0
    results = {}
    for name in args.candidates:
        with tempfile.TemporaryDirectory(prefix="gcvit-compile-cache-") as cache:
            results[name] = {when: _spawn(name, Path(cache), args) for when in ("cold", "warm")}
        print(name, json.dumps(results[name]), flush=True)
    cold = {n: r["cold"].get("compile_s") for n, r in results.items()}
    report = {"benchmark": "compile", "model": args.model, "img_size": args.img_size, "batch": args.batch,
              "results": results,
              "warm_vs_cold": {n: round(r["warm"]["compile_s"] / r["cold"]["compile_s"], 3)
                               for n, r in results.items() if all("compile_s" in t for t in r.values())},
              "cold_vs_timm": {n: round(c / cold["timm-model"], 3) for n, c in cold.items()
                               if c and cold.get("timm-model")}}
    print(f"{'candidate':<12} {'cold s':>8} {'warm s':>8} {'warm/cold':>9} {'cold/timm':>9} {'graphs':>6} "
          f"{'grad err':>9}")
    for n, r in results.items():
        c, w = r["cold"], r["warm"]
        print(f"{n:<12} {c.get('compile_s', 'fail'):>8} {w.get('compile_s', 'fail'):>8} "
              f"{report['warm_vs_cold'].get(n, '-'):>9} {report['cold_vs_timm'].get(n, '-'):>9} "
              f"{c.get('graphs', '-'):>6} {c.get('grad_rel_err', float('nan')):>9.1e}")
    if args.json_out:
        import torch

        from gcvit.engine.provenance import environment
        report["environment"] = environment(torch.device(args.device))
        report["load_average"] = os.getloadavg()
        Path(args.json_out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
