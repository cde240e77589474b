"""The results of one evaluation: a JSON file that says exactly what was measured, and a printed table."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from gcvit.engine.provenance import environment

COLUMNS = ("set", "weights", "top1", "top5", "count", "img_per_s", "protocol")


def sha256(path: Path | str) -> str:
    """The file's sha256, read in 16 MB blocks (checkpoints are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def results_path(run_dir: Path, checkpoint: Path | str, override: str | None) -> Path:
    """eval.results_file, else RUN_DIR/eval/<checkpoint file name without suffix>.json."""
    return Path(override) if override else run_dir / "eval" / f"{Path(checkpoint).stem}.json"


def build(rows: list[dict[str, Any]], *, checkpoint: Path | str, model: str, img_size: int, crop_pct: float,
          interpolation: str, precision: str, world_size: int, device: Any) -> dict[str, Any]:
    """Everything needed to reproduce and compare the rows: what was evaluated, how, and where."""
    env = environment(device)
    return {"checkpoint": str(Path(checkpoint).resolve()), "sha256": sha256(checkpoint),
            "model": model, "img_size": img_size, "crop_pct": crop_pct, "interpolation": interpolation,
            "precision": precision, "world_size": world_size, "commit": env["commit"],
            "device": env["device_name"], "torch": env["torch"], "results": rows}


def write(report: dict[str, Any], path: Path) -> None:
    """Atomically write the report (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def table(rows: list[dict[str, Any]]) -> str:
    """The summary printed at the end of an evaluation: one line per (set, weights)."""
    cells = [[r["set"], r["weights"], f"{r['top1']:.3f}", f"{r['top5']:.3f}",
              f"{r['count']}" + (f" (+{r['excluded']} excluded)" if r.get("excluded") else ""),
              f"{r['img_per_s']:,.0f}" if r.get("img_per_s") else "-", r["protocol"]]
             for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(COLUMNS, *cells)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [COLUMNS, *cells]]
    return "\n".join(lines)
