"""The kernel benchmark's processes and rows (benchmarks/kernel_candidates.py plans them): each run of
benchmarks/kernel_job.py in a child process with its compile cache and its share of the cores, a new one after
a crash, started only if its estimate fits before its phase's end and killed there; every planned run ends as
one row (ok, failed or skipped with the reason), printed as it ends and in the table printed last."""
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
from typing import Any, NamedTuple

import torch

from gcvit.engine.mfu import train_flops_per_image
from gcvit.models import create_model

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "benchmarks" / "kernel_job.py"
# First guesses of what a process costs (s), the compile ones replaced by what the compile workers measure:
# starting (imports, CUDA, model), one eager run (gate and steps), compiling the flex kernels of one eager
# run, the steps of a compiled run, a cold compile by kind; a compile from a warm cache is taken as
# WARM_SHARE of a cold one.
GUESS = {"cuda": {"start": 20.0, "eager": 8.0, "flex": 30.0, "steps": 3.0, "blocks": 60.0, "model": 120.0,
                  "timm": 150.0},
         "cpu": {"start": 10.0, "eager": 5.0, "flex": 5.0, "steps": 2.0, "blocks": 15.0, "model": 15.0,
                 "timm": 15.0}}
WARM_SHARE = 0.2
# FlexAttention's kernel options tried besides its own choice, each as a candidate with the default norm:
# smaller tiles for head dim 32 (torch 2.11's FlexKernelOptions keys; BLOCK_M and BLOCK_N must divide the
# block mask's block; fwd_/bwd_ prefixed keys reach one pass only); mask_block, not a kernel option, sets
# attention_flex.MASK_BLOCK (64: the mask's blocks closer to a 49-token window)
FLEX_OPTIONS = {"m64n64": {"BLOCK_M": 64, "BLOCK_N": 64},
                "m128n64w4s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                "mask64": {"mask_block": 64, "BLOCK_M": 64, "BLOCK_N": 64}}


class Cand(NamedTuple):
    """A candidate: model.attention, model.norm and, for flex, a FLEX_OPTIONS key."""
    attention: str
    norm: str
    options: str = ""

    def config(self, how: str) -> dict[str, str]:
        """As the record names a configuration."""
        return {"attention": self.attention, "norm": self.norm, **({"options": self.options} if self.options
                                                                   else {}), "compile": how}


TIMM = Cand("-", "-")


class Planner:
    """The runs, their processes and the deadline: each process starts only if its estimate fits in the time
    its phase has, and is killed when that is up; every planned run ends as one row."""

    def __init__(self, args: argparse.Namespace, device: str) -> None:
        self.args, self.device = args, device
        self.guess = dict(GUESS[device])
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.rows: dict[str, dict[str, Any]] = {}
        self.extra: dict[str, dict[str, Any]] = {}  # what is not a table row: compile workers', profiles
        self.phases: dict[str, float] = {}
        self.running = 0  # kit processes alive now
        self.lock = threading.Lock()
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="kernel-candidates-"))
        self.caches, self.logs = self.work / "cache", self.work / "logs"
        for mine in (self.caches, self.logs):  # a cold compile needs an empty cache (a rerun's too)
            shutil.rmtree(mine, ignore_errors=True)
        self.logs.mkdir(parents=True)
        # inductor's compile threads per process: the cores shared out while the compile workers run
        self.threads = self.worker_threads = max(1, (os.cpu_count() or 1) // (args.workers + 1))
        # a dry run's model: fewer blocks (one global), so that compiling on a CPU takes seconds
        self.overrides = {"depths": [1, 1, 2, 1]} if args.dry_run else {}
        self.flops = _train_flops(args.model, args.img_size, self.overrides)

    def clock(self) -> str:
        return f"[{time.monotonic() - self.start:.0f} s]"

    def left(self, until: float) -> float:
        return until - time.monotonic()

    def spec(self, rid: str, impl: str, c: Cand, how: str, batch: int, **extra: Any) -> dict[str, Any]:
        """A run as the job takes it."""
        return {"id": rid, "impl": impl, "attention": c.attention, "norm": c.norm, "compile": how,
                "batch": batch, "kernel_options": FLEX_OPTIONS.get(c.options, {}), **extra}

    def row(self, impl: str, c: Cand, how: str, batch: int, **extra: Any) -> dict[str, Any]:
        """A planned table row (status filled in later) and the job's view of it."""
        rid = f"{impl}:{c.attention}{'+' + c.options if c.options else ''}/{c.norm}:{how}:b{batch}"
        self.rows.setdefault(rid, {"impl": impl, "attention": c.attention, "norm": c.norm, "compile": how,
                                   "batch": batch, "status": "planned",
                                   **({"options": c.options, "kernel_options": FLEX_OPTIONS[c.options]}
                                      if c.options else {})})
        return self.spec(rid, impl, c, how, batch, **extra)

    def store(self, rid: str, **fields: Any) -> None:
        with self.lock:
            if rid in self.rows:
                self.rows[rid].update(fields)
            else:  # one result each
                self.extra[rid] = dict(fields)

    def skip(self, runs: list[dict[str, Any]], reason: str) -> None:
        for r in runs:
            self.store(r["id"], status="skipped", reason=reason)

    def cost(self, r: dict[str, Any], warm: bool = False) -> float:
        """Seconds a run is expected to take in a running process: compiling (from a warm cache when a
        compile worker filled it, or `warm`) and its steps."""
        if r["compile"] == "off":
            return self.guess["eager"] + (self.guess["flex"] if r["attention"] == "flex" else 0.0)
        warm = warm or r.get("profile") or self.extra.get("warm:" + r["id"], {}).get("status") == "ok"
        kind = "timm" if r["impl"] == "timm" else r["compile"]
        return self.guess[kind] * (WARM_SHARE if warm else 1.0) + self.guess["steps"]

    def job(self, name: str, runs: list[dict[str, Any]], cache: str, until: float) -> float:
        """Run `runs` in child processes (a new one after a crash) unless the estimate does not fit before
        `until`; the wall time spent."""
        if not runs:
            return 0.0
        first, estimate = (self.guess["start"] + sum(self.cost(r) for r in rs) for rs in (runs[:1], runs))
        if first > self.left(until):  # the runs after the first are stopped at `until` if need be
            why = f"deadline: needs ~{first:.0f} s, {max(self.left(until), 0):.0f} s left"
            self.skip(runs, why)
            print(f"--- {self.clock()} {name}: skipped ({why})", flush=True)
            return 0.0
        print(f"--- {self.clock()} {name}: {len(runs)} run(s), ~{estimate:.0f} s", flush=True)
        start, pending = time.monotonic(), list(runs)
        while pending:
            done, timed_out, code = self.process(name, pending, cache, self.left(until))
            pending = [r for r in pending if r["id"] not in done]
            if pending and timed_out:
                self.skip(pending, "deadline: its process was stopped")
                break
            if pending:  # the process died in this run: report it, go on with the next in a new one
                error = f"process died (exit {code}): " + _last_line(self.logs / f"{name}.log")
                # a Python error before any result (an import, the environment) would end every process
                broken = pending if code == 1 and not done else pending[:1]
                for r in broken:
                    self.store(r["id"], status="failed", error=error)
                pending = pending[len(broken):]
        return time.monotonic() - start

    def process(self, name: str, runs: list[dict[str, Any]], cache: str,
                timeout: float) -> tuple[set[str], bool, int | None]:
        a = self.args
        spec = {"device": self.device, "model": a.model, "img_size": a.img_size, "overrides": self.overrides,
                "mode": a.mode, "steps": a.steps, "warmup": a.warmup, "top": a.top, "dry_run": a.dry_run,
                "flops_per_image": self.flops, "runs": runs}
        path = self.caches / cache
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(path), "TRITON_CACHE_DIR": str(path / "triton"),
               "TORCHINDUCTOR_COMPILE_THREADS": str(self.threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        done: set[str] = set()
        stopped = threading.Event()
        with open(self.logs / f"{name}.log", "a") as log:
            proc = subprocess.Popen([sys.executable, str(JOB), "--spec", json.dumps(spec)], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=log, text=True)
            with self.lock:
                self.running += 1
            timer = threading.Timer(max(timeout, 1.0), lambda: (stopped.set(), proc.kill()))
            timer.start()
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    result = json.loads(line[len("RESULT "):])
                    rid = result.pop("id")
                    done.add(rid)
                    if rid in self.rows:  # how many other kit processes shared the machine meanwhile
                        result["beside"] = self.running - 1
                        self.store(rid, **result)
                        print("  " + describe(self.rows[rid]), flush=True)
                    else:  # a compile worker's or a profile's
                        self.store(rid, **result)
                        print(f"  {rid}: {result['status']}" + (f", compile {result['compile_s']} s"
                              if "compile_s" in result else f": {result.get('error', '')}"), flush=True)
            proc.wait()
            timer.cancel()
            with self.lock:
                self.running -= 1
        return done, stopped.is_set(), proc.returncode

    def workers(self, groups: list[tuple[str, str, list[dict[str, Any]]]],
                until: float) -> list[threading.Thread]:
        """Compile workers: `--workers` threads, each running the next group's process until none is left."""
        queue = list(groups)

        def work() -> None:
            while True:
                with self.lock:
                    if not queue:
                        return
                    name, cache, runs = queue.pop(0)
                self.job(name, runs, cache, until)

        threads = [threading.Thread(target=work, daemon=True)
                   for _ in range(min(self.args.workers, len(groups)))]
        for t in threads:
            t.start()
        return threads

    def profile(self, label: str, key: tuple[Cand, str]) -> dict[str, Any]:
        result = self.extra.get(f"profile-{label}", {"status": "skipped", "reason": "not run"})
        return {"config": key[0].config(key[1]),
                **{k: result.get(k) for k in ("status", "error", "reason", "img_s", "compile_s", "kernels")}}


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


def name(row: dict[str, Any]) -> str:
    """attention[+flex kernel options]/norm, as the table and the log name a candidate."""
    options = f"+{row['options']}" if row.get("options") else ""
    return f"{row['attention']}{options}/{row['norm']}"


def describe(row: dict[str, Any]) -> str:
    what = f"{row['impl']} {name(row)} {row['compile']} b{row['batch']}"
    if row["status"] != "ok":
        return f"{what}: {row['status']}: {row.get('error') or row.get('reason')}"
    extra = f", compile {row['compile_s']} s" if "compile_s" in row else ""
    return f"{what}: {row['img_s']} img/s{extra}"


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
    head = ("impl", "attention/norm", "compile", "batch", "img/s", "vs timm", "mem GiB", "MFU", "compile s",
            "warm s", "status")
    lines = [head]
    for r in rows:
        ok = r["status"] == "ok"
        lines.append((r["impl"], name(r), r["compile"], str(r["batch"]), str(r.get("img_s", "")),
                      str(r.get("vs_timm", "")), str(r.get("peak_mem_gib", "")),
                      f"{r['mfu']:.1%}" if ok and r.get("mfu") else "", str(r.get("compile_s", "")),
                      str(r.get("compile_warm_s", "")),
                      "ok" if ok else f"{r['status']}: {r.get('error') or r.get('reason')}"[:70]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines)
