"""The GPU kit's kernel benchmark (benchmarks/kernel_candidates.py) end to end on CPU: its dry run takes the
code path of a GPU run (compile workers beside the gated eager runs, the compiled phase on the merged caches,
timm eager and compiled, flex kernel options, profiles, deadline, JSON, table) at a tiny size; a failing
candidate is reported and skipped, and what the deadline leaves out says so."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STATUSES = {"ok", "failed", "skipped"}


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "candidates.json"
    proc = subprocess.run([sys.executable, "benchmarks/kernel_candidates.py", "--dry-run", "--norm", "fp32",
                           "--json-out", str(out), "--work-dir", str(tmp_path / "work"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def _rows(record: dict) -> dict[tuple, dict]:
    """(impl, attention[+options]/norm, compile, batch) -> row, as the table names them."""
    return {(r["impl"], f"{r['attention']}{'+' + r['options'] if r.get('options') else ''}/{r['norm']}",
             r["compile"], r["batch"]): r for r in record["rows"]}


@pytest.mark.slow  # about eight processes, four compiling (aot_eager), two at a time: minutes on 2 busy cores
def test_dry_run_measures_gates_compiles_and_profiles(tmp_path: Path) -> None:
    """The CPU default (math attention) passes its gate and is timed eager and compiled by blocks (cold in a
    compile worker, warm in the compiled phase), against timm eager and compiled whole; flex, which has no
    CPU backward, fails its gate, with and without kernel options (recorded), is reported, and its compiled
    run is skipped; the best and the default configuration are profiled; the table comes last."""
    proc, record = _run(tmp_path, "--attention", "flex", "--compile", "blocks", "--flex-options", "m64n64")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.rstrip().splitlines()[-1 - len(record["rows"])].split()[:5] == \
        ["impl", "attention/norm", "compile", "batch", "img/s"]
    assert record["benchmark"] == "kernel_candidates" and record["dry_run"] is True
    assert {"device_name", "torch", "timm", "commit", "elapsed_s", "budget_s"} <= record.keys()
    assert set(record["phases_s"]) == {"eager and compile workers", "compiled", "profiles and best"}
    assert record["workers"] == 2 and record["compile_threads"] >= 1
    assert record["batches"] == [2] and record["train_gflop_per_image"] > 0
    assert record["default"] == {"attention": "math", "norm": "fp32", "compile": "off"}
    rows = _rows(record)
    assert all(r["status"] in STATUSES for r in record["rows"])
    eager = rows[("ours", "math/fp32", "off", 2)]
    assert eager["status"] == "ok" and eager["img_s"] > 0 and eager["step_ms"] > 0
    assert max(eager["gate"].values()) < 1e-2 and "vs_timm" in eager and eager["beside"] >= 0
    for name in ("flex/fp32", "flex+m64n64/fp32"):
        flex = rows[("ours", name, "off", 2)]
        assert flex["status"] == "failed" and "backward" in flex["error"], flex
        assert rows[("ours", name, "blocks", 2)]["status"] == "skipped"
    assert rows[("ours", "flex+m64n64/fp32", "off", 2)]["kernel_options"] == {"BLOCK_M": 64, "BLOCK_N": 64}
    for key in (("timm", "-/-", "off", 2), ("timm", "-/-", "model", 2)):
        assert rows[key]["status"] == "ok", rows[key]
    for key in (("ours", "math/fp32", "blocks", 2), ("timm", "-/-", "model", 2)):
        compiled = rows[key]  # cold in its own worker's cache, then warm in the compiled phase
        assert compiled["status"] == "ok" and compiled["compile_cache"] == "cold", compiled
        assert compiled["compile_s"] >= 0 and compiled["compile_warm_s"] >= 0
        assert set(compiled["cache"]) == {"hits", "compiled"}
    assert record["compile_workers"]["ours:math/fp32:blocks:b2"]["status"] == "ok"
    best = record["best"]
    assert best["attention"] == "math" and best["compile"] in ("off", "blocks")
    for label in ("best", "default"):
        profile = record["profiles"][label]
        assert profile["status"] == "ok", profile
        assert profile["kernels"] and {"name", "ms_per_step", "share"} == set(profile["kernels"][0])
        assert profile["kernels"][0]["share"] >= profile["kernels"][-1]["share"]


def test_what_the_deadline_leaves_out_is_listed_as_skipped(tmp_path: Path) -> None:
    """A budget too short for anything: every planned run is in the record, skipped, with the deadline as
    the reason; no process starts; the exit code says nothing was measured."""
    proc, record = _run(tmp_path, "--attention", "math", "--compile", "blocks", "--budget", "1")
    assert proc.returncode == 1
    assert {(r["impl"], r["compile"]) for r in record["rows"]} == {("ours", "off"), ("ours", "blocks"),
                                                                   ("timm", "off"), ("timm", "model")}
    assert all(r["status"] == "skipped" for r in record["rows"])
    assert all(r["reason"].startswith(("deadline", "its eager run skipped")) for r in record["rows"])
    assert record["best"] is None and record["profiles"] == {}
    assert not list((tmp_path / "work" / "logs").iterdir())
