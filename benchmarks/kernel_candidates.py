"""One kit call decides the GPU train step's kernels: every model.attention x model.norm candidate that
passes its correctness gate, eager and compiled (trainer.compile blocks and model), at each batch size,
against timm's GC ViT eager and compiled whole; img/s, peak memory, MFU, compile time cold and warm (warm: a
second process on the first one's compile cache) and the top kernels of the best and of the default
configuration, all under one global deadline (what would not fit is skipped, and says so). One JSON, and a
table printed last.

    python benchmarks/kernel_candidates.py [--budget 480] [--json-out FILE]   # GPU: gcvit_tiny, bf16, 128/256
    python benchmarks/kernel_candidates.py --dry-run   # CPU (so without CUDA): gcvit_xxtiny, 64 px, batch 2

Each process runs benchmarks/kernel_job.py: a candidate that fails is reported and skipped; one that breaks
the CUDA context ends its process, and the runs left go on in a new one. Order, most telling first: all
eager runs (and the gate, on the first batch size) in one process; then compiled runs, one process each,
first batch size: the default configuration, timm, the other candidates by eager rank (blocks, then model
for the best); then the second batch size the same way; last, the profiles, which reuse the compile caches.
The dry run compiles with the aot_eager backend: dynamo and AOTAutograd, without inductor's code generation.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from gcvit.engine.metrics import peak_flops, train_flops_per_image
from gcvit.engine.provenance import environment
from gcvit.kernel_choices import ATTENTION_AUTO, COMPILE_AUTO, NORM_AUTO
from gcvit.models import create_model

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "benchmarks" / "kernel_job.py"
# First guesses of what a process costs (s), each replaced by what this run measures: starting (imports,
# CUDA, model), one eager run (flex compiles its kernel once), one compile by kind; a warm compile is
# taken as WARM_SHARE of a cold one.
GUESS = {"cuda": {"start": 20.0, "eager": 8.0, "blocks": 60.0, "model": 120.0, "timm": 150.0},
         "cpu": {"start": 10.0, "eager": 5.0, "blocks": 15.0, "model": 15.0, "timm": 15.0}}
WARM_SHARE = 0.3
GPU_ATTENTION, CPU_ATTENTION = ["sdpa", "flex", "math"], ["math", "sdpa", "flex"]
# What a GPU run measures, and a dry run (CPU)
DEFAULTS = {"model": ("gcvit_tiny", "gcvit_xxtiny"), "img_size": (224, 64), "batches": ([128, 256], [2]),
            "attention": (GPU_ATTENTION, CPU_ATTENTION), "budget": (480.0, 600.0), "steps": (10, 1),
            "warmup": (3, 0)}


class Planner:
    """The runs, their processes and the deadline: each process starts only if its estimate fits in what is
    left before the profiles' reserve, and is killed at that point; every run ends as one row."""

    def __init__(self, args: argparse.Namespace, device: str) -> None:
        self.args, self.device = args, device
        self.guess = dict(GUESS[device])
        self.deadline = time.monotonic() + args.budget
        self.rows: dict[str, dict[str, Any]] = {}
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="kernel-candidates-"))
        self.logs = self.work / "logs"
        for mine in (self.work / "cache", self.logs):  # a cold compile needs an empty cache (a rerun's too)
            shutil.rmtree(mine, ignore_errors=True)
        self.logs.mkdir(parents=True)
        # a dry run's model: fewer blocks (one global), so that compiling on a CPU takes seconds
        self.overrides = {"depths": [1, 1, 2, 1]} if args.dry_run else {}
        self.flops = _train_flops(args.model, args.img_size, self.overrides)

    def reserve(self) -> float:
        """Seconds kept for the two profiles (start, warm compile, a run each)."""
        g = self.guess
        return 2 * (g["start"] + WARM_SHARE * g["blocks"] + g["eager"])

    def clock(self) -> str:
        return f"[{self.args.budget - self.left(reserved=False):.0f} s]"

    def left(self, reserved: bool = True) -> float:
        return self.deadline - time.monotonic() - (self.reserve() if reserved else 0.0)

    def row(self, impl: str, attention: str, norm: str, how: str, batch: int, **extra: Any) -> dict[str, Any]:
        """A planned run: its row (status filled in later) and the job's view of it."""
        rid = f"{impl}:{attention}/{norm}:{how}:b{batch}"
        self.rows.setdefault(rid, {"impl": impl, "attention": attention, "norm": norm, "compile": how,
                                   "batch": batch, "status": "planned"})
        return {"id": rid, "impl": impl, "attention": attention, "norm": norm, "compile": how, "batch": batch,
                **extra}

    def job(self, name: str, runs: list[dict[str, Any]], kind: str, cache: str,
            reserved: bool = True) -> float:
        """Run `runs` in child processes (a new one after a crash) unless the estimate does not fit; the
        wall time spent. `kind`: the guess that prices each run (eager | blocks | model | timm)."""
        estimate = self.guess["start"] + len(runs) * self.guess[kind]
        if kind != "eager":
            estimate += len(runs) * self.guess["eager"]
        if estimate > self.left(reserved):
            why = f"deadline: needs ~{estimate:.0f} s, {max(self.left(reserved), 0):.0f} s left"
            self.skip(runs, why)
            print(f"--- {self.clock()} {name}: skipped ({why})", flush=True)
            return 0.0
        print(f"--- {self.clock()} {name}: {len(runs)} run(s), ~{estimate:.0f} s", flush=True)
        start, pending = time.monotonic(), list(runs)
        while pending:
            done, timed_out, code = self._process(name, pending, cache, self.left(reserved))
            pending = [r for r in pending if r["id"] not in done]
            if pending and timed_out:
                self.skip(pending, "deadline: its process was stopped")
                break
            if pending:  # the process died in this run: report it, go on with the next in a new one
                error = f"process died (exit {code}): " + _last_line(self.logs / f"{name}.log")
                # a Python error before any result (an import, the environment) would end every process
                broken = pending if code == 1 and not done else pending[:1]
                for r in broken:
                    self.rows[r["id"]].update(status="failed", error=error)
                pending = pending[len(broken):]
        return time.monotonic() - start

    def _process(self, name: str, runs: list[dict[str, Any]], cache: str,
                 timeout: float) -> tuple[set[str], bool, int | None]:
        a = self.args
        spec = {"device": self.device, "model": a.model, "img_size": a.img_size, "overrides": self.overrides,
                "mode": a.mode, "steps": a.steps, "warmup": a.warmup, "top": a.top, "dry_run": a.dry_run,
                "flops_per_image": self.flops, "runs": runs}
        path = self.work / "cache" / cache
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(path), "TRITON_CACHE_DIR": str(path / "triton"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        done: set[str] = set()
        stopped = threading.Event()
        with open(self.logs / f"{name}.log", "a") as log:
            proc = subprocess.Popen([sys.executable, str(JOB), "--spec", json.dumps(spec)], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=log, text=True)
            timer = threading.Timer(max(timeout, 1.0), lambda: (stopped.set(), proc.kill()))
            timer.start()
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    result = json.loads(line[len("RESULT "):])
                    rid = result.pop("id")
                    self.rows[rid].update(result)
                    done.add(rid)
                    print("  " + describe(self.rows[rid]), flush=True)
            proc.wait()
            timer.cancel()
        return done, stopped.is_set(), proc.returncode

    def skip(self, runs: list[dict[str, Any]], reason: str) -> None:
        for r in runs:
            self.rows[r["id"]].update(status="skipped", reason=reason)

    def profile(self, label: str, key: tuple[str, str, str], batch: int) -> dict[str, Any]:
        """One more process for configuration `key`: its top kernels, and for a compiled one the warm compile
        (the first process's cache), which goes into that configuration's row as compile_warm_s."""
        row = self.rows[self.row("ours", *key, batch)["id"]]
        run = {**self.row("ours", *key, batch), "id": f"profile-{label}", "profile": True}
        self.rows[run["id"]] = {k: row[k] for k in ("impl", "attention", "norm", "compile", "batch")}
        self.rows[run["id"]]["status"] = "planned"
        cache = "eager" if key[2] == "off" else f"ours-{key[0]}-{key[1]}-{key[2]}"
        self.job(f"profile-{label}", [run], "eager" if key[2] == "off" else key[2], cache, reserved=False)
        result = self.rows.pop(run["id"])
        if key[2] != "off" and result.get("compile_s") is not None:
            row["compile_warm_s"] = result["compile_s"]
        return {"config": dict(zip(("attention", "norm", "compile"), key)),
                **{k: result.get(k) for k in ("status", "error", "reason", "img_s", "compile_s", "kernels")}}

    def learn(self, kind: str, wall: float, runs: int) -> None:
        """Replace the guess of one run of `kind` by what a job of `runs` such runs took."""
        if wall > 0 and runs:
            timing = 0.0 if kind == "eager" else self.guess["eager"]  # a compiled run also times its steps
            self.guess[kind] = max((wall - self.guess["start"]) / runs - timing, 1.0)


def _train_flops(model: str, img_size: int, overrides: dict[str, Any]) -> float:
    """FLOPs of one image's train step, counted on the meta device through the math form (the same count
    for every candidate and for timm's model, which computes the same function)."""
    with torch.device("meta"):
        net = create_model(model, img_size=img_size, attention="math", **overrides)
    return train_flops_per_image(net, img_size, torch.device("meta"))


def _last_line(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def describe(row: dict[str, Any]) -> str:
    name = f"{row['impl']} {row['attention']}/{row['norm']} {row['compile']} b{row['batch']}"
    if row["status"] != "ok":
        return f"{name}: {row['status']}: {row.get('error') or row.get('reason')}"
    extra = f", compile {row['compile_s']} s" if "compile_s" in row else ""
    return f"{name}: {row['img_s']} img/s{extra}"


def plan(p: Planner) -> dict[str, Any]:
    """Run every phase; the record's configurations: default, best, and the profiles."""
    a, dev = p.args, p.device
    default = (ATTENTION_AUTO.get(dev, "sdpa"), NORM_AUTO.get(dev, "fp32"), COMPILE_AUTO.get(dev, "off"))
    cands = [default[:2]] + [(att, n) for att in a.attention for n in a.norm if (att, n) != default[:2]]
    b0 = a.batches[0]
    # 1. eager, each candidate's gate on the first batch size; timm's eager step
    runs = [p.row("ours", *c, "off", b, gate=True) for c in cands for b in a.batches]
    runs += [p.row("timm", "-", "-", "off", b) for b in a.batches] if a.timm else []
    p.learn("eager", p.job("eager", runs, "eager", "eager"), len(runs))
    eager = {c: p.rows[p.row("ours", *c, "off", b0)["id"]] for c in cands}
    passed = sorted((c for c in cands if eager[c]["status"] == "ok"), key=lambda c: -eager[c]["img_s"])
    # 2. compiled, one process per run: the default's compile, timm's, the others' blocks by eager rank, the
    # eager best's model; every one at the first batch size before any at the second
    jobs = [("ours", c, "blocks") for c in passed if "blocks" in a.compile]
    jobs += [("ours", passed[0], "model")] if passed and "model" in a.compile else []
    first = ("ours", default[:2], default[2])
    jobs.sort(key=lambda j: j != first)
    if a.timm and "model" in a.compile:  # timm compiled whole, as its users compile it
        jobs.insert(int(bool(jobs) and jobs[0] == first), ("timm", ("-", "-"), "model"))
    for c in cands:
        for how in a.compile:
            if ("ours", c, how) not in jobs:
                why = f"its eager run {eager[c]['status']}" if c not in passed else \
                    "model compile: the eager best only"
                p.skip([p.row("ours", *c, how, b) for b in a.batches], why)
    for batch in a.batches:
        for impl, c, how in jobs:
            kind = "timm" if impl == "timm" else how
            wall = p.job(f"{impl}-{c[0]}-{c[1]}-{how}-b{batch}", [p.row(impl, *c, how, batch)], kind,
                         f"{impl}-{c[0]}-{c[1]}-{how}")
            p.learn(kind, wall, 1)
    # 3. the best and the default configuration profiled at the first batch size, on the warm caches
    ok = {(r["attention"], r["norm"], r["compile"]): r for r in p.rows.values()
          if r["status"] == "ok" and r["batch"] == b0 and r["impl"] == "ours"}
    best = max(ok, key=lambda k: ok[k]["img_s"]) if ok else None
    if default not in ok:  # the default's compile did not run: its eager form stands for it
        default = (*default[:2], "off")
    profiles = {}
    if best is not None:
        profiles["best"] = p.profile("best", best, b0)
    if default in ok:
        profiles["default"] = profiles["best"] if default == best else p.profile("default", default, b0)
    names = ("attention", "norm", "compile")
    return {"default": dict(zip(names, default)),
            "best": {**dict(zip(names, best)), "img_s": ok[best]["img_s"]} if best else None,
            "profiles": profiles}


def ratios(rows: list[dict[str, Any]]) -> None:
    """Each of our rows' img/s over timm's at the same batch size, eager against eager, compiled against
    timm compiled whole."""
    timm = {(r["compile"] != "off", r["batch"]): r["img_s"] for r in rows if r["impl"] == "timm"
            and r["status"] == "ok"}
    for r in rows:
        ref = timm.get((r["compile"] != "off", r["batch"]))
        if r["impl"] == "ours" and r["status"] == "ok" and ref:
            r["vs_timm"] = round(r["img_s"] / ref, 3)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("impl", "attention", "norm", "compile", "batch", "img/s", "vs timm", "mem GiB", "MFU",
            "compile s", "warm s", "status")
    lines = [head]
    for r in rows:
        ok = r["status"] == "ok"
        lines.append((r["impl"], r["attention"], r["norm"], r["compile"], str(r["batch"]),
                      str(r.get("img_s", "")), str(r.get("vs_timm", "")), str(r.get("peak_mem_gib", "")),
                      f"{r['mfu']:.1%}" if ok and r.get("mfu") else "", str(r.get("compile_s", "")),
                      str(r.get("compile_warm_s", "")),
                      "ok" if ok else f"{r['status']}: {r.get('error') or r.get('reason')}"[:70]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny model, one timed step (also without CUDA)")
    p.add_argument("--model", help="variant (gcvit_tiny; dry run: gcvit_xxtiny)")
    p.add_argument("--img-size", type=int, help="224 (dry run: 64)")
    p.add_argument("--batches", type=int, nargs="+", help="128 256 (dry run: 2)")
    p.add_argument("--attention", nargs="+",
                   help=f"GPU: {' '.join(GPU_ATTENTION)}; CPU: {' '.join(CPU_ATTENTION)}")
    p.add_argument("--norm", nargs="+", default=["fp32", "fast"])
    p.add_argument("--compile", nargs="*", default=["blocks", "model"], choices=["blocks", "model"],
                   help="compiled forms timed besides eager (model: timm's too)")
    p.add_argument("--mode", default="default", help="trainer.compile_mode of every compiled run")
    p.add_argument("--no-timm", dest="timm", action="store_false", help="leave timm's model out")
    p.add_argument("--budget", type=float, help="seconds for everything (480; dry run: 600)")
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
    start = time.monotonic()
    record = plan(planner)
    rows = list(planner.rows.values())
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
              "elapsed_s": round(time.monotonic() - start, 1),
              "train_gflop_per_image": round(planner.flops / 1e9, 2),
              "peak_tflops": peak / 1e12 if peak else None, **record, "rows": rows}
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {out} (logs: {planner.logs})\n")
    print(table(rows), flush=True)
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
