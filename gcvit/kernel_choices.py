"""The kernel and compile choices of a run, named without torch: the config validates against them, the model
(gcvit/models/attention.py, ops.py) and the engine (gcvit/engine/compile.py) implement them.

`auto` is a table per device type: the choice measured fastest there. CPU: the math attention form and fp32
LayerNorm (docs/models.md), no compile. CUDA: what the one GPU run so far measured (H200, torch 2.11: sdpa,
LayerNorm in fp32, the whole model compiled); the GPU kit's candidates table (benchmarks/kernel_candidates.py,
docs/gpu-kit.md) decides the rest. Regional compile (blocks) has not run on a GPU yet, and on CPU it compiled
gcvit_tiny no faster than the whole model (docs/benchmarks.md#compile): it is a choice, not yet the default.
"""
from __future__ import annotations

ATTENTION_KINDS = ("auto", "sdpa", "flex", "math")  # model.attention
NORM_KINDS = ("auto", "fp32", "fast")  # model.norm
COMPILE_KINDS = ("off", "model", "blocks", "auto")  # trainer.compile
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")  # trainer.compile_mode

# Keyed by device type, or by GPU family ("cuda:sm90", "cuda:sm80") where the kit's winners differ by family;
# "": any other device.
ATTENTION_AUTO = {"cpu": "math", "cuda": "sdpa", "": "sdpa"}
NORM_AUTO = {"cpu": "fp32", "cuda": "fp32", "": "fp32"}
COMPILE_AUTO = {"cpu": "off", "cuda": "model", "": "off"}


def auto(table: dict[str, str], device: str) -> str:
    """A table's choice for `device` ("cpu", "cuda:sm90"): its GPU family's entry, else its type's, else the
    table's entry for any other device."""
    return table.get(device) or table.get(device.split(":")[0]) or table[""]

# Graphs one compiled function may keep (dynamo's default is 8): a block region or the compiled flex kernel
# meets one per (stage shape, local or global, batch size, train or eval); past the limit dynamo runs the
# function eager, which for flex is its unfused reference.
RECOMPILE_LIMIT = 64
