"""The stall verdict: from every rank's heartbeat (and NCCL flight-recorder dumps) who the job waits for,
one line that says so, and the exit code that tells the launcher what to do.

Ranks in a waiting phase (a collective, the step boundary) that still beat wait for the others; every other
rank is stuck. Stuck ranks while others wait: a node fault (NODE_FAULT_EXIT_CODE, their nodes blamed).
Every rank waiting in a collective: the collective itself hangs (a NIC, the network, a GPU fault, NCCL):
the flight recorder may still show a rank whose newest collective never started on its GPU (then that
rank's node is blamed), else STALL_EXIT_CODE (requeue as is). Every rank stuck outside collectives:
BUG_EXIT_CODE (a deadlock in the code or the data; a restart would repeat it).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from gcvit.engine.distributed import BUG_EXIT_CODE, NODE_FAULT_EXIT_CODE, STALL_EXIT_CODE

WAITING = ("all-reduce", "step boundary")  # phases in which a rank waits for the others
FR_PREFIX = "nccl-trace-rank"  # <prefix><rank>: the flight recorder's dumps, as torch's analyser reads them
MAX_CLAUSES = 6  # groups of stuck ranks the line names; verdict.json lists every rank
_WHERE = {"loading": "the data loader", "compute": "forward/backward", "all-reduce": "all-reduce",
          "step boundary": "the step boundary", "startup": "startup", "eval": "evaluation",
          "checkpoint": "a checkpoint save"}


def ranks_text(ranks: list[int]) -> str:
    """[0, 1, 2, 4, 6, 7] -> '0-2, 4, 6-7'."""
    spans: list[list[int]] = []
    for r in sorted(ranks):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def _who(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {ranks_text(ranks)}"


def _clauses(stuck: list[int], beats: dict[int, dict[str, Any]], silent: dict[int, float],
             recorder: bool) -> list[str]:
    """The stuck ranks, one clause per node, phase and silence (a failed switch makes hundreds alike)."""
    groups: dict[tuple[str, str, bool], list[int]] = {}
    for r in stuck:
        hb = beats.get(r)
        key = ("", "", False) if hb is None else (hb["host"], hb["phase"], r in silent)
        groups.setdefault(key, []).append(r)
    out = []
    for (host, phase, quiet), ranks in groups.items():
        if not host:
            out.append(f"{_who(ranks)} never sent a heartbeat")
            continue
        if recorder:
            out.append(f"{_who(ranks)} ({host}) never started its newest collective (NCCL flight recorder)")
            continue
        age = max(beats[r]["age"] + silent.get(r, 0.0) for r in ranks)
        text = f"{_who(ranks)} ({host}) last seen in {_WHERE.get(phase, phase)} {age:.0f} s ago"
        if quiet:
            text += f", silent for {min(silent[r] for r in ranks):.0f} s (process frozen or node down)"
        out.append(text)
    if len(out) > MAX_CLAUSES:
        out[MAX_CLAUSES:] = [f"{len(out) - MAX_CLAUSES} more group(s) in verdict.json"]
    return out


def verdict(beats: dict[int, dict[str, Any]], world: int, silent: dict[int, float],
            recorder_blame: list[int] | None = None) -> dict[str, Any]:
    """Who the job waits for. `beats`: each rank's last heartbeat (a rank without one never started);
    `silent`: rank -> seconds the judging rank saw its heartbeat unchanged (frozen or gone);
    `recorder_blame`: the ranks the flight recorder points at (used when every rank waits)."""
    waiting = [r for r in range(world) if r in beats and beats[r]["phase"] in WAITING and r not in silent]
    stuck = [r for r in range(world) if r not in waiting]
    recorder = not stuck and bool(recorder_blame)
    if recorder:
        stuck = sorted(recorder_blame or [])
        waiting = [r for r in waiting if r not in stuck]
    lines = _clauses(stuck, beats, silent, recorder)
    # the step the waiting ranks are in (a stuck rank may not have finished the one before)
    steps = [beats[r]["step"] for r in waiting] or [hb["step"] for hb in beats.values()]
    at = min(steps) + 1 if steps else 0
    if waiting:
        where = "all-reduce" if all(beats[r]["phase"] == "all-reduce" for r in waiting) else "collectives"
        lines.append(f"{_who(waiting)} waiting in {where}")
    if stuck and waiting:
        code = NODE_FAULT_EXIT_CODE
    elif not stuck:
        code = STALL_EXIT_CODE
        lines.append("every rank waits in a collective, no rank to blame (a NIC, the network, a GPU fault or "
                     "NCCL); requeue as is")
    else:
        code = BUG_EXIT_CODE
        lines.append("no single rank to blame (shared storage or a deadlock in the code)")
    nodes = sorted({beats[r]["host"] for r in stuck if r in beats}) if code == NODE_FAULT_EXIT_CODE else []
    return {"step": at, "stuck": stuck, "waiting": waiting, "silent": sorted(silent), "nodes": nodes,
            "code": code, "line": f"stall at step {at}: " + "; ".join(lines)}


def never_started(dumps: dict[int, dict[str, Any]]) -> list[int]:
    """From each rank's flight-recorder dump (torch's pickled dict with `entries`), the ranks the others
    wait for on the default process group: behind in collectives, or whose newest collective is still only
    scheduled (never started on its GPU) while another rank's has started. [] when nothing stands out."""
    newest = {}
    for rank, dump in dumps.items():
        entries = [e for e in dump.get("entries", []) if str(e.get("process_group", ("0",))[0]) == "0"]
        if entries:
            newest[rank] = max(entries, key=lambda e: e["collective_seq_id"])
    if not newest:
        return []
    top = max(e["collective_seq_id"] for e in newest.values())
    behind = sorted(r for r, e in newest.items() if e["collective_seq_id"] < top)
    if behind:
        return behind
    scheduled = sorted(r for r, e in newest.items() if e.get("state") == "scheduled")
    return scheduled if len(scheduled) < len(newest) else []


def recorder_blame(folder: Path) -> list[int]:
    """never_started() of the dumps the ranks wrote into `folder` (the run's own files)."""
    dumps = {}
    for path in folder.glob(FR_PREFIX + "*"):
        try:
            dumps[int(path.name[len(FR_PREFIX):])] = pickle.loads(path.read_bytes())
        except Exception:  # cut short by a rank that died while dumping, or another torch's format: left out
            continue
    try:
        return never_started(dumps)
    except (KeyError, TypeError, AttributeError, IndexError):  # entries of another torch's format: no blame
        return []
