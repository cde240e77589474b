"""torch.compile of the model: whether, how (whole model or block by block) and with which cache."""
from __future__ import annotations

from gcvit.config import Config
from gcvit.engine.distributed import DistEnv


def compiled(cfg: Config, env: DistEnv) -> bool:
    """Whether the model runs through torch.compile: trainer.compile, where null means on CUDA only."""
    return cfg.trainer.compile if cfg.trainer.compile is not None else env.device.type == "cuda"
