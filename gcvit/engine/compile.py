"""How the model runs on the device: its kernels (model.attention, model.norm), torch.compile and its cache.

Kernels: the config's choice, with the two cases a run cannot take as asked settled at start in one line.
trainer.compile:
- model: the whole network (under DDP, the wrapper too: dynamo splits the graph at the buckets);
- blocks: each region the model names (GCViT.compile_regions(): every block, downsampler and global-query
  generator) compiled on its own; regions of one shape share one compiled graph, so the 19 blocks of a
  stage compile once, and the DDP wrapper and the rest of the model stay eager (torchtitan compiles this way);
- auto: model on CUDA (measured there; blocks awaits the GPU kit), off on CPU (where compiling costs minutes
  for a few seconds of demo steps).
The caches of inductor and AOTAutograd live in trainer.compile_cache (default RUN_DIR/compile-cache), so a
requeued job, on any node that sees the run directory, starts from compiled code instead of compiling again.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from gcvit.config import Config
from gcvit.engine.distributed import DistEnv
from gcvit.kernel_choices import ATTENTION_AUTO, COMPILE_AUTO, NORM_AUTO, RECOMPILE_LIMIT, auto


def device_key(device: torch.device) -> str:
    """What the `auto` tables are keyed by: "cpu", or the GPU's family ("cuda:sm90")."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda:sm{major}{minor}"


def attention_of(cfg: Config, env: DistEnv) -> str:
    """model.attention resolved for this device: `auto` becomes the measured choice for its GPU family or
    device type."""
    attention = cfg.model.attention
    return auto(ATTENTION_AUTO, device_key(env.device)) if attention == "auto" else attention


def kernels(cfg: Config, env: DistEnv, training: bool) -> tuple[str, str]:
    """(attention, norm) for model.set_kernels(), `auto` resolved for the device: the configured ones,
    except that FlexAttention, which has no backward on CPU, stops a CPU training run, and
    trainer.deterministic trades it for sdpa."""
    attention = attention_of(cfg, env)
    if attention == "flex" and training and env.device.type == "cpu":
        raise SystemExit("config error: model.attention=flex cannot train on CPU (FlexAttention has no CPU "
                         "backward in this torch); on CPU use model.attention=auto (math) or sdpa")
    if attention == "flex" and cfg.trainer.deterministic:
        if env.is_main:
            print("model.attention=flex adds the bias gradient with atomics (not deterministic); "
                  "trainer.deterministic=true runs model.attention=sdpa instead", flush=True)
        attention = "sdpa"
    norm = auto(NORM_AUTO, device_key(env.device)) if cfg.model.norm == "auto" else cfg.model.norm
    return attention, norm


def how(cfg: Config, env: DistEnv) -> str:
    """trainer.compile resolved for this device: off | model | blocks. CUDA graphs (reduce-overhead) only
    where they are proven: one process compiling the whole model."""
    kind = cfg.trainer.compile
    if kind == "auto":
        kind = auto(COMPILE_AUTO, device_key(env.device))
    if cfg.trainer.compile_mode == "reduce-overhead" and kind != "off" and (kind != "model" or
                                                                             env.world_size > 1):
        raise SystemExit(f"config error: trainer.compile_mode=reduce-overhead (CUDA graphs) runs with "
                         f"trainer.compile=model in one process only (here compile={kind}, "
                         f"{env.world_size} process(es)); use trainer.compile_mode=default or "
                         "max-autotune-no-cudagraphs")
    return kind


def compiled(cfg: Config, env: DistEnv) -> bool:
    """Whether the model runs through torch.compile."""
    return how(cfg, env) != "off"


def compiles(cfg: Config, env: DistEnv) -> bool:
    """Whether anything of the run compiles: the model, or FlexAttention (compiled on its own when the model
    is not), whose graphs belong in the same cache."""
    return compiled(cfg, env) or attention_of(cfg, env) == "flex"


def compile_model(net: nn.Module, model: nn.Module, kind: str, mode: str = "default",
                  backend: str = "inductor") -> nn.Module:
    """What the step calls: `net` (the model or its DDP wrapper) compiled whole, or with the regions of the
    bare `model` compiled in place (kind: off | model | blocks); `backend` as torch.compile's."""
    mode_arg = None if mode == "default" else mode
    if kind == "model":  # static shapes, as for the regions below
        return torch.compile(net, mode=mode_arg, dynamic=False, backend=backend)
    if kind == "blocks":
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        for region in model.compile_regions():
            # static shapes: a region of another stage's shape gets its own graph rather than turning the
            # first one dynamic (automatic dynamic shapes), whose kernels are slower and fail in inductor
            region.compile(mode=mode_arg, dynamic=False, backend=backend)
    return net


def use_cache(cfg: Config, run_dir: Path) -> Path:
    """Point the caches of inductor, AOTAutograd and Triton at trainer.compile_cache (default
    RUN_DIR/compile-cache), before anything compiles."""
    directory = Path(cfg.trainer.compile_cache or run_dir / "compile-cache").resolve()
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    os.environ["TRITON_CACHE_DIR"] = str(directory / "triton")
    return directory


def _cache_counts() -> tuple[int, int]:
    """Graphs inductor took from its cache and graphs it compiled, in this process so far."""
    c = torch._dynamo.utils.counters["inductor"]
    return c["fxgraph_cache_hit"], c["fxgraph_cache_miss"]


class CompileClock:
    """Times the first step(s) of a compiled run and says, in one line, whether the cache was warm."""

    def __init__(self, kind: str, mode: str, cache: Path) -> None:
        self.kind, self.mode, self.cache = kind, mode, cache
        self.start, self.counts = time.perf_counter(), _cache_counts()

    def report(self) -> str:
        """The line: how, where the cache is, warm or cold, how many graphs and how long compiling took."""
        hits, misses = (now - then for now, then in zip(_cache_counts(), self.counts))
        state = "warm" if hits and not misses else "cold" if not hits else "partly warm"
        return (f"compile: {self.kind} (mode {self.mode}), cache {self.cache}: {state}, {hits} graph(s) from "
                f"the cache, {misses} compiled; the first step took {time.perf_counter() - self.start:.1f} s")
