"""One kit call decides the GPU train step's kernels: every model.attention x model.norm candidate (and flex
with a few kernel option sets for head dim 32) that passes its correctness gate, timed eager at each batch
size and compiled by blocks at the first, the default configuration also compiled whole, against timm's GC ViT
eager and compiled whole; img/s, peak memory, MFU, compile time cold and warm and the top kernels of the best
and of the default configuration, under one global deadline (what would not fit is skipped, and says so).
One JSON, and a table printed last.

    python benchmarks/kernel_candidates.py [--budget 480] [--json-out FILE]   # GPU: gcvit_tiny, bf16, 128/256
    python benchmarks/kernel_candidates.py --dry-run   # CPU (so without CUDA): gcvit_xxtiny, 64 px, batch 2

Phases (each process runs benchmarks/kernel_job.py; a candidate that fails is reported and skipped, one that
breaks the CUDA context ends its process and the runs left go on in a new one):
1. side by side: --workers compile workers (the cores shared out as inductor's compile threads) fill the
   compile caches: first the default configuration compiled by blocks and whole and timm's model compiled
   whole, each first of its kind in a cache of its own (their cold compile times), then the eager flex
   kernels and every other candidate's blocks in one shared cache; meanwhile one process gates every
   candidate and times every eager step (first batch size, then the second), timm's too.
2. the caches merged, one process times the compiled runs at the first batch size from the warm caches: the
   default by blocks first (a new process on a warm cache: its warm compile time) and its profile, timm,
   the default whole, then the other gated candidates by eager rank, as many as the deadline allows.
3. the best configuration's profile (when it is not the default) and, if it is compiled, its compiled step
   at the second batch size.
The dry run compiles with the aot_eager backend: dynamo and AOTAutograd, without inductor's code generation.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from kernel_planner import FLEX_OPTIONS, TIMM, WARM_SHARE, Cand, Planner, ratios, table

from gcvit.engine.compile import device_key
from gcvit.engine.mfu import peak_flops
from gcvit.engine.provenance import environment
from gcvit.kernel_choices import ATTENTION_AUTO, COMPILE_AUTO, NORM_AUTO, auto

ROOT = Path(__file__).resolve().parents[1]
GPU_ATTENTION, CPU_ATTENTION = ["sdpa", "flex", "math"], ["math", "sdpa", "flex"]
# What a GPU run measures, and a dry run (CPU)
DEFAULTS = {"model": ("gcvit_tiny", "gcvit_xxtiny"), "img_size": (224, 64), "batches": ([128, 256], [2]),
            "attention": (GPU_ATTENTION, CPU_ATTENTION), "flex_options": (list(FLEX_OPTIONS), []),
            "budget": (480.0, 600.0), "steps": (10, 1), "warmup": (3, 0), "workers": (4, 2)}


def candidates(a: argparse.Namespace, default: Cand) -> list[Cand]:
    """The default first, flex (which compiles its kernel even eager) last, then its kernel option sets."""
    cands = [default] + [Cand(att, n) for att in a.attention for n in a.norm if Cand(att, n) != default]
    cands.sort(key=lambda c: c.attention == "flex")
    return cands + [Cand("flex", default.norm, o) for o in a.flex_options if "flex" in a.attention]


def cold_cache(r: dict[str, Any]) -> str:
    """The cache of a first compile of its kind (cold: nothing else compiles into it)."""
    return f"cold-{r['impl']}-{r['compile']}"


def side_by_side(p: Planner, cands: list[Cand], firsts: list[dict[str, Any]], rest: list[dict[str, Any]],
                 until: float) -> None:
    """Phase 1: the compile workers fill the caches (`firsts` each cold in a cache of its own, the eager flex
    kernels and `rest` in the shared one) while one process gates the candidates and times the eager steps;
    then the cold compiles measured replace the guesses and their caches join the shared one."""
    a, b0 = p.args, p.args.batches[0]

    def warm(r: dict[str, Any]) -> dict[str, Any]:
        return {**r, "id": "warm:" + r["id"], "warm": True}

    groups = [(cold_cache(r), cold_cache(r), [warm(r)]) for r in firsts]
    flex = [c for c in cands if c.attention == "flex"]
    if flex:
        groups.append(("warm-flex-eager", "shared", [
            p.spec(f"warm:flex-eager-{i}-b{b}", "ours", c, "off", b, warm=True, gate=b == b0)
            for b in a.batches for i, c in enumerate(flex)]))
    groups += [(f"warm-blocks-{i // 2 + 1}", "shared", [warm(r) for r in rest[i:i + 2]])
               for i in range(0, len(rest), 2)]
    threads = p.workers(groups, until)
    # the default and timm first, flex (compiling its kernels) last; each candidate's gate with its first run
    order = [("ours", cands[0])] + ([("timm", TIMM)] if a.timm else []) + [("ours", c) for c in cands[1:]]
    eager = [p.row(impl, c, "off", b, gate=impl == "ours" and b == b0) for flexed in (False, True)
             for b in a.batches for impl, c in order if (c.attention == "flex") == flexed]
    p.job("eager", eager, "shared", until)
    for thread in threads:
        thread.join()
    for r in firsts:
        done = p.extra.get("warm:" + r["id"], {})
        if done.get("status") == "ok":
            p.guess["timm" if r["impl"] == "timm" else r["compile"]] = max(done["compile_s"], 1.0)
        cache = p.caches / cold_cache(r)
        if cache.is_dir():
            shutil.copytree(cache, p.caches / "shared", dirs_exist_ok=True)


def compiled_phase(p: Planner, timed: list[tuple[Cand, dict[str, Any]]], firsts: list[dict[str, Any]],
                   default: Cand, until: float) -> None:
    """Phase 2: one process on the merged caches: the default (and its profile) and timm first, then the
    other gated candidates by eager rank, as many as fit before `until`."""
    b0 = p.args.batches[0]
    eager = {c: p.rows[p.row("ours", c, "off", b0)["id"]] for c, _ in timed if c != TIMM}
    gated = [(c, r) for c, r in timed if c == TIMM or eager[c]["status"] == "ok"]
    for c, r in timed:
        if (c, r) not in gated:
            p.skip([r], f"its eager run {eager[c]['status']}")
    head = [r for c, r in gated if c in (default, TIMM)]
    runs = head + [r for c, r in sorted((cr for cr in gated if cr[0] not in (default, TIMM)),
                                        key=lambda cr: -eager[cr[0]]["img_s"])]
    if gated and gated[0][0] == default:  # the default's first compiled run: its profile follows it
        runs.insert(1, {**runs[0], "id": "profile-default", "profile": True})
    fit, spent = [], p.guess["start"]
    for r in runs:
        spent += p.cost(r)
        if spent > p.left(until):
            p.skip([r], "deadline: the compiled phase's time ran out")
        else:
            fit.append(r)
    p.job("compiled", fit, "shared", until)
    cold = {r["id"] for r in firsts}
    for r in fit:  # compile time in a worker (cold when first of its kind) and here, from the warm cache
        row, warm = p.rows.get(r["id"]), p.extra.get("warm:" + r["id"], {})
        if row and row.get("compile_s") is not None and warm.get("status") == "ok":
            row.update(compile_warm_s=row["compile_s"], compile_s=warm["compile_s"],
                       compile_cache="cold" if r["id"] in cold else "shared")


def plan(p: Planner) -> dict[str, Any]:
    """Run every phase; the record's configurations: default, best, and the profiles."""
    a, dev = p.args, p.device
    key = device_key(torch.device(dev))  # a run on this GPU resolves auto by its family, as here
    default = Cand(auto(ATTENTION_AUTO, key), auto(NORM_AUTO, key))
    cands = candidates(a, default)
    b0, later = a.batches[0], a.batches[1:]
    kinds = [how for how in ("blocks", "model") if how in a.compile]
    timed = [(default, p.row("ours", default, how, b0)) for how in kinds]  # phase 2's runs, in order
    if a.timm:  # timm compiled whole, as its users compile it: always measured
        timed.insert(1, (TIMM, p.row("timm", TIMM, "model", b0)))
    timed += [(c, p.row("ours", c, "blocks", b0)) for c in cands if c != default and "blocks" in kinds]
    firsts = [r for c, r in timed if c in (default, TIMM)]  # first of its kind: compiled cold
    # phase 3 needs a process for the best's profile, phase 2 one for the compiled runs (all from warm caches,
    # as planned) and the default's profile: phase 1 ends where they would need the rest
    last = p.guess["start"] + WARM_SHARE * p.guess["blocks"] + p.guess["steps"]
    tail = p.guess["start"] + sum(p.cost(r, warm=True) for _, r in timed) + p.guess["steps"] + last
    t = time.monotonic()
    side_by_side(p, cands, firsts, [r for _, r in timed if r not in firsts], p.deadline - tail)
    p.phases["eager and compile workers"] = round(time.monotonic() - t, 1)
    p.threads = os.cpu_count() or 1  # one process at a time from here on: every core compiles
    t = time.monotonic()
    compiled_phase(p, timed, firsts, default, p.deadline - last)
    p.phases["compiled"] = round(time.monotonic() - t, 1)
    # phase 3: the best configuration's profile, and its compiled step at the second batch size
    t = time.monotonic()
    ok = {(Cand(r["attention"], r["norm"], r.get("options", "")), r["compile"]): r for r in p.rows.values()
          if r["status"] == "ok" and r["batch"] == b0 and r["impl"] == "ours"}
    best = max(ok, key=lambda k: ok[k]["img_s"]) if ok else None
    default_key = (default, kinds[0]) if kinds and p.extra.get("profile-default", {}).get("status") == "ok" \
        else (default, "off")
    profiling = [p.spec("profile-best", "ours", best[0], best[1], b0, profile=True)] \
        if best and best != default_key else []
    if default_key[1] == "off" and default_key in ok:  # the default's compiled run did not run: its eager one
        profiling.append(p.spec("profile-default", "ours", default, "off", b0, profile=True))
    p.job("profiles", profiling, "shared", p.deadline)
    if best and best[1] != "off" and later:
        p.job(f"best-compiled-b{later[0]}", [p.row("ours", best[0], best[1], later[0])], "shared", p.deadline)
    p.phases["profiles and best"] = round(time.monotonic() - t, 1)
    profiles = {"default": p.profile("default", default_key)} if default_key in ok else {}
    if best:
        profiles["best"] = profiles.get("default") if best == default_key else p.profile("best", best)
    return {"default": default.config(auto(COMPILE_AUTO, key)),
            "best": {**best[0].config(best[1]), "img_s": ok[best]["img_s"]} if best else None,
            "profiles": profiles}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny model, one timed step (also without CUDA)")
    p.add_argument("--model", help="variant (gcvit_tiny; dry run: gcvit_xxtiny)")
    p.add_argument("--img-size", type=int, help="224 (dry run: 64)")
    p.add_argument("--batches", type=int, nargs="+", help="128 256 (dry run: 2): eager at each, compiled at "
                                                          "the first (the best also at the second)")
    p.add_argument("--attention", nargs="+",
                   help=f"GPU: {' '.join(GPU_ATTENTION)}; CPU: {' '.join(CPU_ATTENTION)}")
    p.add_argument("--norm", nargs="+", default=["fp32", "fast"])
    p.add_argument("--flex-options", nargs="*", choices=list(FLEX_OPTIONS),
                   help=f"flex kernel option sets, one candidate each (GPU: {' '.join(FLEX_OPTIONS)}; CPU: "
                        "none)")
    p.add_argument("--compile", nargs="*", default=["blocks", "model"], choices=["blocks", "model"],
                   help="compiled forms of ours (blocks: every candidate; model: the default); timm's is "
                        "compiled whole always")
    p.add_argument("--mode", default="default", help="trainer.compile_mode of every compiled run")
    p.add_argument("--no-timm", dest="timm", action="store_false", help="leave timm's model out")
    p.add_argument("--budget", type=float, help="seconds for everything (480; dry run: 600)")
    p.add_argument("--workers", type=int, help="compile processes beside the timing one (4; dry run: 2)")
    p.add_argument("--steps", type=int, help="timed steps per run, median reported (10; dry run: 1)")
    p.add_argument("--warmup", type=int, help="untimed steps after the first (3; dry run: 0)")
    p.add_argument("--top", type=int, default=15, help="kernels listed per profile")
    p.add_argument("--work-dir", help="compile caches and the processes' logs (default: a new temp dir)")
    p.add_argument("--json-out", help="the record (default: benchmarks/results/<device>-<model>-bf16-kernel-"
                                      "candidates-<stamp>.json; a dry run: in the work dir)")
    a = p.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        print("kernel_candidates: no CUDA device: a dry run on CPU at a tiny size", flush=True)
        a.dry_run = True
    dev = "cpu" if a.dry_run else "cuda"
    for key, (gpu, cpu) in DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, cpu if a.dry_run else gpu)
    planner = Planner(a, dev)
    record = plan(planner)
    # the table by batch size, eager before compiled, each in the order planned
    rows = sorted(planner.rows.values(), key=lambda r: (r["batch"], r["compile"] != "off"))
    ratios(rows)
    device = torch.device(dev)
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime())
    out = Path(a.json_out or (planner.work if a.dry_run else ROOT / "benchmarks" / "results")
               / f"{'gpu' if dev == 'cuda' else 'cpu'}-{a.model}-bf16-kernel-candidates-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    peak = peak_flops(device, "bf16")
    record = {"benchmark": "kernel_candidates", "argv": sys.argv[1:] if argv is None else argv,
              **environment(device), "dry_run": a.dry_run, "model": a.model, "img_size": a.img_size,
              "precision": "bf16", "batches": a.batches, "budget_s": a.budget,
              "elapsed_s": round(time.monotonic() - planner.start, 1), "phases_s": planner.phases,
              "workers": a.workers, "compile_threads": planner.worker_threads,
              "train_gflop_per_image": round(planner.flops / 1e9, 2),
              "peak_tflops": peak / 1e12 if peak else None, **record, "rows": rows,
              "compile_workers": {k[5:]: v for k, v in planner.extra.items() if k.startswith("warm:")}}
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {out} (logs: {planner.logs})\n")
    print(table(rows), flush=True)
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
