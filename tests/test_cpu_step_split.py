"""benchmarks/cpu_step_split.py on a small model: it splits both models the same way, times what it says and
reports the GEMM share from the profiler (the rates themselves are the benchmark's business, not a test's)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_split_covers_stem_and_stages_of_both_models(tmp_path: Path) -> None:
    out = tmp_path / "split.json"
    proc = subprocess.run([sys.executable, "benchmarks/cpu_step_split.py", "--model", "gcvit_xxtiny",
                           "--img-size", "64", "--batch", "2", "--repeats", "1", "--top", "3",
                           "--fixed-malloc", "--json-out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    result = record["result"]
    assert record["benchmark"] == "cpu_step_split"
    assert (result["model"], result["fixed_malloc"]) == ("gcvit_xxtiny", True)
    parts = result["parts_fwd_bwd_ms"]
    assert list(parts) == ["stem", "stage0", "stage1", "stage2", "stage3"]
    step = result["train_step"]
    step_row = {"ours": step["ours"]["ms"], "timm": step["timm"]["ms"], "ratio": step["ratio"]}
    for row in [*parts.values(), step_row]:
        assert row["ours"] > 0 and row["timm"] > 0
        assert abs(row["ratio"] - row["timm"] / row["ours"]) < 0.01
    for impl in ("ours", "timm"):
        prof = result["profile"][impl]
        assert 0 < prof["gemm_ms"] < prof["total_ms"] and len(prof["top_other_ms"]) == 3
        assert not any(op in prof["top_other_ms"] for op in ("aten::mm", "aten::addmm", "aten::bmm"))
        assert step[impl]["minor_faults"] >= 0
    assert result["sgemm_2048_gflop_s"] > 0 and result["timm_gemm_gflop_s"] > 0
    # the printed table names every part and the step
    for name in [*parts, "train step", "ours top others", "timm top others"]:
        assert name in proc.stdout
