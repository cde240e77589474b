"""trainer.compile: regional compilation builds one graph per distinct block shape, and the compile cache
makes a second start warm (the one line at start says which)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import gcvit
from gcvit.config import Config
from gcvit.engine.compile import CompileClock, compile_model, use_cache
from gcvit.models.gcvit import GCViTBlock


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_blocks_compile_each_distinct_region_once_and_match_eager() -> None:
    """gcvit_xxtiny's shape with 4 stage-3 blocks: 18 regions, 16 distinct (class, shape, local or global);
    the drop path rates (each block its own) must not split a shape into several graphs: they are read from
    a buffer, so that new rates change what the compiled graphs compute without compiling again."""
    torch.manual_seed(0)
    model = gcvit.create_model("gcvit_xxtiny", num_classes=10, img_size=64, depths=(2, 2, 4, 2),
                               drop_path_rate=0.3)
    x, y = torch.randn(2, 3, 64, 64), torch.arange(2)
    regions = model.compile_regions()
    distinct = {(type(m).__name__, tuple(p.shape for p in m.parameters()),
                 isinstance(m, GCViTBlock) and m.attn.use_global) for m in regions}
    assert (len(regions), len(distinct)) == (18, 16)
    reference = copy.deepcopy(model)  # stays eager
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    net = compile_model(model, model, "blocks", backend="eager")
    assert net is model  # the wrapper (here the model itself) stays eager; its regions are compiled
    F.cross_entropy(net(x), y).backward()
    assert _graphs() == len(distinct)
    for block in [*model.modules(), *reference.modules()]:
        if isinstance(block, GCViTBlock):
            block.drop_path = 0.0  # compiled: every sample kept; eager: the plain residual
    loss = F.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert _graphs() == len(distinct)  # no recompile for the new rates
    eager = F.cross_entropy(reference(x), y)
    torch.testing.assert_close(loss, eager)
    for a, b in zip(grads, torch.autograd.grad(eager, list(reference.parameters()))):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_a_second_start_reads_the_compile_cache(tmp_path, monkeypatch) -> None:
    """Two compiles of one module in one process, the second after dynamo forgets the first (as a requeued
    job's new process does): the first line says cold, the second warm, both name the cache directory."""
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # restored after the test
        monkeypatch.setenv(var, str(tmp_path / "elsewhere"))
    cfg = Config()
    cfg.trainer.compile_cache = str(tmp_path / "cache")
    cache = use_cache(cfg, tmp_path / "run")
    assert cache == tmp_path / "cache" and cache.is_dir()
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    x = torch.randn(4, 8)
    lines = []
    for _ in range(2):
        torch._dynamo.reset()
        clock = CompileClock("model", "default", cache)
        out = compile_model(module, module, "model")(x)
        lines.append(clock.report())
        torch.testing.assert_close(out, module(x))
    torch._dynamo.reset()
    assert f"cache {cache}: cold, 0 graph(s) from the cache, 1 compiled" in lines[0]
    assert f"cache {cache}: warm, 1 graph(s) from the cache, 0 compiled" in lines[1]
    assert any(cache.rglob("*")), "nothing was written to the compile cache"
