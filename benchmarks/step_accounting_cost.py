"""What the per-rank step accounting (gcvit.engine.step_accounting) costs a training step on CPU: the
trainer's train_step of a model on synthetic data, timed with the StepClock and with a clock whose methods do
nothing (the calibrated gradient hook stays: one call a step), in alternating rounds in one process, plus the
clock's own calls timed alone.

    python benchmarks/step_accounting_cost.py [--model debug=tiny] [--steps 10] [--rounds 4]

Prints one JSON: median step seconds with and without the accounting, their relative difference (noise
included: on a shared machine a difference below the rounds' spread is no difference), and the clock's own
microseconds per step, which is the cost that does not drown in noise.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from gcvit import list_models
from gcvit.config import from_hydra, register
from gcvit.engine import distributed
from gcvit.engine.build import build
from gcvit.engine.loop import train_step
from gcvit.engine.provenance import environment
from gcvit.engine.step_accounting import StepClock
from gcvit_data.resolve import resolve_data

CONF = Path(__file__).resolve().parents[1] / "conf"


class NoClock(StepClock):
    """The accounting switched off: every call returns at once."""

    def start(self) -> None:
        pass

    def next_batch(self, batches: Iterator[Any]) -> tuple[Any, float]:
        return next(batches), 0.0

    def backward_done(self) -> None:
        pass

    @contextlib.contextmanager
    def collective(self) -> Iterator[None]:
        yield

    def finish(self) -> None:
        pass


def clock_calls_us(n: int = 20000) -> float:
    """Microseconds of one step's clock calls (start, a batch, the gradient hook, reduced, the collective,
    finish) with nothing else around them."""
    clock = StepClock(torch.device("cpu"))
    batches = iter(range(n + 1))
    param = torch.zeros(1)
    tic = time.perf_counter()
    for _ in range(n):
        clock.start()
        clock.next_batch(batches)
        clock._grads_ready(0, param)
        clock.backward_done()
        with clock.collective():
            pass
        clock.finish()
    return (time.perf_counter() - tic) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="debug=tiny", help="a preset override naming the model (debug=tiny)")
    ap.add_argument("--steps", type=int, default=10, help="steps per round and variant")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds of both variants")
    args = ap.parse_args()
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = from_hydra(compose(config_name="config", overrides=[
            args.model, "data=synthetic", "trainer.device=cpu", "trainer.ema_decay=null"]), list_models)
    env = distributed.init("cpu")
    data = resolve_data(cfg.data, is_main=True, local_rank=0, broadcast=distributed.broadcast_object)
    p = build(cfg, env, data)
    on, off = p.clock, NoClock(env.device)
    batches, stop = iter(p.train_loader), torch.zeros((), dtype=torch.float64)
    times: dict[str, list[float]] = {"on": [], "off": []}
    train_step(p, batches, env, cfg, stop)  # warm-up (the clock calibrates its hook here)
    for _ in range(args.rounds):
        for name, clock in (("on", on), ("off", off)):
            p.clock = clock
            for _ in range(args.steps):
                tic = time.perf_counter()
                train_step(p, batches, env, cfg, stop)
                times[name].append(time.perf_counter() - tic)
    step_on, step_off = statistics.median(times["on"]), statistics.median(times["off"])
    calls = clock_calls_us()
    print(json.dumps({"model": args.model, "steps": args.steps * args.rounds, "step_s_with": step_on,
                      "step_s_without": step_off, "difference": step_on / step_off - 1,
                      "clock_us_per_step": calls, "clock_share": calls * 1e-6 / step_off,
                      "threads": torch.get_num_threads(), **environment(env.device)}, indent=1))


if __name__ == "__main__":
    main()
