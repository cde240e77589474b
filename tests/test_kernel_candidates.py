"""The GPU kit's kernel benchmark (benchmarks/kernel_candidates.py) end to end on CPU: its dry run takes the
code path of a GPU run (gate, eager and compiled processes, timm, profiles, deadline, JSON, table) at a tiny
size; a failing candidate is reported and skipped, and what the deadline leaves out says so."""
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
    return {(r["impl"], r["attention"], r["norm"], r["compile"], r["batch"]): r for r in record["rows"]}


@pytest.mark.slow  # three processes, one compiling (aot_eager): about a minute on 2 busy cores
def test_dry_run_measures_gates_compiles_and_profiles(tmp_path: Path) -> None:
    """The CPU default (math attention) passes its gate and is timed eager and compiled (blocks), against
    timm eager (timm's compiled whole model comes with --compile model); flex, which has no CPU backward,
    fails its gate, is reported, and its compiled run is skipped; the best and the default configuration
    are profiled; the table comes last."""
    proc, record = _run(tmp_path, "--attention", "flex", "--compile", "blocks")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.rstrip().splitlines()[-1 - len(record["rows"])].split()[:6] == \
        ["impl", "attention", "norm", "compile", "batch", "img/s"]
    assert record["benchmark"] == "kernel_candidates" and record["dry_run"] is True
    assert {"device_name", "torch", "timm", "commit", "elapsed_s", "budget_s"} <= record.keys()
    assert record["batches"] == [2] and record["train_gflop_per_image"] > 0
    assert record["default"] == {"attention": "math", "norm": "fp32", "compile": "off"}
    rows = _rows(record)
    assert all(r["status"] in STATUSES for r in record["rows"])
    eager = rows[("ours", "math", "fp32", "off", 2)]
    assert eager["status"] == "ok" and eager["img_s"] > 0 and eager["step_ms"] > 0
    assert max(eager["gate"].values()) < 1e-2 and "vs_timm" in eager
    flex = rows[("ours", "flex", "fp32", "off", 2)]
    assert flex["status"] == "failed" and "backward" in flex["error"]
    assert rows[("ours", "flex", "fp32", "blocks", 2)] | {"status": "skipped"} == \
        rows[("ours", "flex", "fp32", "blocks", 2)]
    assert rows[("timm", "-", "-", "off", 2)]["status"] == "ok"
    assert ("timm", "-", "-", "model", 2) not in rows
    blocks = rows[("ours", "math", "fp32", "blocks", 2)]
    assert blocks["status"] == "ok", blocks
    assert blocks["compile_s"] >= 0 and set(blocks["cache"]) == {"hits", "compiled"}
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
                                                                   ("timm", "off")}
    assert all(r["status"] == "skipped" for r in record["rows"])
    assert all(r["reason"].startswith(("deadline", "its eager run skipped")) for r in record["rows"])
    assert record["best"] is None and record["profiles"] == {}
    assert not list((tmp_path / "work" / "logs").iterdir())
