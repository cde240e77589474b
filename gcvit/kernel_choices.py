"""The kernel and compile choices of a run, named without torch: the config validates against them, the model
(gcvit/models/attention.py, ops.py) and the engine (gcvit/engine/compile.py) implement them.

`auto` is a table per device type: the choice measured fastest there. CPU: the math attention form and fp32
LayerNorm (docs/models.md). CUDA: what the one GPU run so far measured (H200, torch 2.11: sdpa; LayerNorm in
fp32); the GPU kit's candidates table (benchmarks/kernel_candidates.py, docs/gpu-kit.md) decides the rest.
"""
from __future__ import annotations

ATTENTION_KINDS = ("auto", "sdpa", "flex", "math")  # model.attention
NORM_KINDS = ("auto", "fp32", "fast")  # model.norm
COMPILE_KINDS = ("off", "model", "blocks", "auto")  # trainer.compile
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")  # trainer.compile_mode

ATTENTION_AUTO = {"cpu": "math", "cuda": "sdpa"}  # any other device type: sdpa
NORM_AUTO = {"cpu": "fp32", "cuda": "fp32"}  # any other device type: fp32
COMPILE_AUTO = {"cpu": "off", "cuda": "blocks"}  # any other device type: off
