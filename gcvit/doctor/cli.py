"""The command line of `python -m gcvit.doctor`: compose train.py's config, run every check on every
rank, merge what the ranks saw, print the table (rank 0), write --json; the exit code.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, NoReturn

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gcvit import doctor
from gcvit.config import Config, register, validate, with_demo_default
from gcvit.doctor import checks, projections, ranks
from gcvit.doctor.checks import FAIL, OK, SEVERITY, WARN, Row
from gcvit.engine import distributed
from gcvit.variants import list_models

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# The table's rows in this order; a new check adds its name here.
ORDER = ("config", "torch", "cuda", "gpus", "dali", "launcher", "nccl-env", "interconnect", "allreduce",
         "grad-sync", "data-index", "data-read", "data-epoch", "disk", "wandb")


def compose(overrides: list[str]) -> Config:
    """conf/config.yaml with train.py's overrides applied as train.py applies them (the demo when nothing is
    named), as the typed Config (not yet validated)."""
    register()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="doctor"):
            cfg = hydra_compose(config_name="config", overrides=with_demo_default(overrides))
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except (HydraException, OmegaConfBaseException) as e:
        usage(f"the overrides do not compose: {str(e).strip().splitlines()[0]}")


def usage(message: str) -> NoReturn:
    """A command line that cannot run: one line on stderr, exit code 2."""
    print(f"doctor: {message}", file=sys.stderr)
    raise SystemExit(2)


def config_row(cfg: Config, overrides: list[str]) -> Row:
    """train.py's validation of the composed config."""
    try:
        validate(cfg, list_models)
    except SystemExit as e:
        return Row("config", FAIL, str(e.code))
    return Row("config", OK, f"{cfg.name}: model {cfg.model.name} at {cfg.model.img_size} px, "
               f"{cfg.trainer.precision}, global batch {cfg.trainer.global_batch_size}"
               + (f" ({' '.join(overrides)})" if overrides else ""))


def merge(per_rank: list[list[Row]], hosts: list[str]) -> list[Row]:
    """One row per check: rank 0's, unless another rank saw worse, then the worst one and where it was."""
    merged = []
    for name in dict.fromkeys(r.check for rows in per_rank for r in rows):
        seen = [(rank, r) for rank, rows in enumerate(per_rank) for r in rows if r.check == name]
        rank, worst = max(seen, key=lambda s: (SEVERITY[s[1].status], -s[0]))  # ties: the lowest rank
        if rank != 0:
            n = sum(r.status == worst.status for _, r in seen)
            worst = Row(name, worst.status, f"rank {rank} on {hosts[rank]} ({n} of {len(per_rank)} ranks): "
                        f"{worst.detail}", worst.values)
        merged.append(worst)
    return merged


def table(rows: list[Row], header: str) -> str:
    """The rows as aligned text, long details wrapped under their own column."""
    width = max(len(r.check) for r in rows)
    lines = [header, f"{'CHECK'.ljust(width)}  STATUS  DETAIL"]
    for r in rows:
        wrapped = textwrap.wrap(r.detail, 110 - width - 10, break_on_hyphens=False) or [""]
        lines.append(f"{r.check.ljust(width)}  {r.status.ljust(6)}  {wrapped[0]}")
        lines += [" " * (width + 10) + w for w in wrapped[1:]]
    return "\n".join(lines)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m gcvit.doctor", description=doctor.__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="train.py's Hydra overrides, e.g. data.root=/data/imagenet")
    p.add_argument("--json", metavar="PATH", help="also write the rows (and measured figures) as JSON")
    p.add_argument("--sample-files", type=int, default=256, help="files each rank reads to time the storage")
    p.add_argument("--target-img-s", type=float, default=None,
                   help="img/s one GPU trains at (default: benchmarks/results for the model, else 2000)")
    p.add_argument("--allreduce-mb", type=float, default=None,
                   help="all-reduce message size in MB (default 256 with CUDA, 32 on CPU)")
    args = p.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        usage(f"{bad[0]!r} is not an override; write key=value, e.g. data.root=/data/imagenet")
    return args, args.overrides


def main(argv: list[str] | None = None) -> int:
    """Run every check, print the table on rank 0, write --json; returns the exit code (all ranks agree)."""
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    cfg = compose(overrides)
    try:
        # train.py's 30-minute collective timeout: the first scan of a large dataset on a cold shared
        # filesystem can keep one rank busy for minutes while the others wait in the gather.
        env = distributed.init("cpu" if cfg.trainer.device == "cpu" else "auto")
    except RuntimeError as e:  # torch's rendezvous and NCCL errors (DistNetworkError, DistStoreError, ...)
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        print(f"doctor: FAIL launcher: cannot join the process group at {where}: "
              f"{str(e).strip().splitlines()[0]}; check that every rank was started and the address is "
              "reachable from all nodes", file=sys.stderr)
        return 1
    started = time.time()
    local, facts = ranks.node_rows(cfg, env, args)
    local.insert(0, config_row(cfg, overrides))
    gathered = distributed.gather_object((socket.gethostname(), local, facts))
    nodes, measured = ranks.measure_cluster(env, args)  # a collective: every rank takes part
    code = 0
    if env.is_main:
        assert gathered is not None
        hosts = [h for h, _, _ in gathered]
        rows = merge([r for _, r, _ in gathered], hosts)
        all_facts = [f for _, _, f in gathered]
        rate, source = projections.target_rate(cfg.model.name, args.target_img_s)
        classes = all_facts[0].classes
        for check, fn, *fn_args in (
                ("interconnect", projections.cluster_rows, env, nodes, measured),
                ("grad-sync", projections.grad_sync_row, cfg, measured, classes, rate),
                ("data-epoch", projections.data_rows, cfg, env, all_facts, rate, source),
                ("disk", projections.disk_row, cfg, classes),
                ("wandb", checks.wandb_row, cfg.logger.wandb.mode)):
            rows += ranks.guarded(check, fn, *fn_args)
        rows.sort(key=lambda r: ORDER.index(r.check))
        header = (f"gcvit.doctor: {env.world_size} rank(s) on {len(set(hosts))} node(s), "
                  f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}")
        print(table(rows, header), flush=True)
        blockers = [r for r in rows if r.status == FAIL]
        warns = sum(r.status == WARN for r in rows)
        print(f"{len(rows)} checks: {len(rows) - len(blockers) - warns} {OK}, {warns} {WARN}, "
              f"{len(blockers)} {FAIL}", flush=True)
        for r in blockers:
            print(f"doctor: FAIL {r.check}: {r.detail}", file=sys.stderr, flush=True)
        if args.json:
            out = Path(args.json)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report(rows, env.world_size, hosts, started), indent=2) + "\n")
        code = 1 if blockers else 0
    code = distributed.broadcast_object(code)
    distributed.shutdown()
    return code


def report(rows: list[Row], world_size: int, hosts: list[str], started: float) -> dict[str, Any]:
    """The JSON document of --json."""
    return {"tool": "gcvit.doctor", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "world_size": world_size, "hosts": sorted(set(hosts)), "torch": torch.__version__,
            "ok": all(r.status != FAIL for r in rows),
            "rows": [{"check": r.check, "status": r.status, "detail": r.detail, "values": r.values}
                     for r in rows]}

