"""Exact top-1/top-5 over the val split during training (mode=eval: gcvit.engine.eval_mode)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gcvit.engine import distributed
from gcvit.engine.distributed import DistEnv
from gcvit.engine.runtime import autocast


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, env: DistEnv, precision: str) -> dict[str, float]:
    """Exact top-1/top-5 over the val split; counts are reduced once, ids prove every image came once."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=env.device)  # correct@1, correct@5, seen
    ids = [torch.zeros(0, dtype=torch.int64)]
    for batch in loader:
        with autocast(env.device, precision):
            logits = model(batch.images)
        hit = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == batch.labels[:, None]
        counts[0] += hit[:, 0].sum()
        counts[1] += hit.any(dim=-1).sum()
        counts[2] += len(hit)
        ids.append(batch.ids)
    model.train(was_training)
    distributed.all_reduce_sum(counts)
    gathered = distributed.gather_object(torch.cat(ids))
    distinct = distributed.broadcast_object(int(torch.cat(gathered).unique().numel()) if gathered else 0)
    c1, c5, seen = counts.tolist()
    if distinct != int(seen):
        raise RuntimeError(f"the val loader yielded {int(seen)} images but {distinct} distinct ids; every "
                           "val image must come exactly once across ranks")
    return {"top1": 100.0 * c1 / max(seen, 1), "top5": 100.0 * c5 / max(seen, 1), "count": distinct}
