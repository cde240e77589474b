"""Predictions over an eval set, gathered exactly once across ranks, and the scores each set's rule gives."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from data.eval_sets import EvalSet
from gcvit.engine import distributed
from gcvit.engine.distributed import DistEnv
from gcvit.engine.setup import autocast

ECE_BINS = 15


@dataclass
class Predictions:
    """Per image of a set (rank 0 only), ordered by sample id."""

    ids: torch.Tensor  # (N,) sample ids into the set's index
    top5: torch.Tensor  # (N, k) predicted class indices, best first (k = min(5, classes))
    confidence: torch.Tensor  # (N,) softmax probability of the top-1 class
    labels: torch.Tensor  # (N,) true class index


@torch.no_grad()
def predict(model: nn.Module, loader: Any, env: DistEnv, precision: str,
            subset: list[int] | None = None) -> Predictions | None:
    """Run the set through the model on every rank; rank 0 gets every image's prediction exactly once."""
    was_training = model.training
    model.eval()
    keep = None if subset is None else torch.tensor(subset, device=env.device)
    parts: list[tuple[torch.Tensor, ...]] = []
    for batch in loader:
        with autocast(env.device, precision):
            logits = model(batch.images)
        logits = logits.float() if keep is None else logits.float()[:, keep]
        prob, top = logits.softmax(-1).topk(min(5, logits.shape[-1]), dim=-1)
        if keep is not None:
            top = keep[top]  # back to indices of the model's classes
        parts.append((batch.ids, top.cpu(), prob[:, 0].cpu(), batch.labels.cpu()))
    model.train(was_training)
    gathered = distributed.gather_object(parts)
    if gathered is None:
        return None
    flat = [p for rank in gathered for p in rank]
    ids, top5, conf, labels = (torch.cat([p[i] for p in flat]) for i in range(4))
    order = ids.argsort()
    return Predictions(ids[order], top5[order], conf[order], labels[order])


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor,
                               bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence| weighted by the bin's share."""
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(confidence, edges[1:-1], right=True)  # bin b holds (edges[b], edges[b+1]]
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.double().mean() * (correct[m].double().mean() - confidence[m].double().mean()).abs()
    return float(ece)


def score(eset: EvalSet, preds: Predictions) -> dict[str, Any]:
    """Top-1/top-5 under the set's rule, the image count, and (val) calibration and per-class accuracy."""
    n_index = len(eset.index)
    if preds.ids.numel() != n_index or not torch.equal(preds.ids, torch.arange(n_index)):
        raise RuntimeError(f"eval set {eset.name}: the loaders yielded {preds.ids.numel()} images "
                           f"({preds.ids.unique().numel()} distinct) for {n_index} in the set; every image "
                           "must come exactly once across ranks")
    if eset.real is not None:
        keep = torch.tensor([bool(s) for s in eset.real])
        sets = [set(s) for s in eset.real]
        hit1 = torch.tensor([int(p) in s for p, s in zip(preds.top5[:, 0].tolist(), sets)])
        hit5 = torch.tensor([bool(s.intersection(p)) for p, s in zip(preds.top5.tolist(), sets)])
        hit1, hit5 = hit1[keep], hit5[keep]
        excluded = int((~keep).sum())
    else:
        hits = preds.top5 == preds.labels[:, None]
        hit1, hit5, excluded = hits[:, 0], hits.any(-1), 0
    count = int(hit1.numel())
    out: dict[str, Any] = {"top1": 100.0 * float(hit1.double().mean()),
                           "top5": 100.0 * float(hit5.double().mean()),
                           "count": count, "excluded": excluded, "protocol": eset.protocol}
    if eset.name == "val":
        correct = preds.top5[:, 0] == preds.labels
        out["ece"] = expected_calibration_error(preds.confidence, correct)
        classes = eset.index.classes
        per = torch.zeros(len(classes), dtype=torch.float64).index_add_(0, preds.labels, correct.double())
        seen = torch.bincount(preds.labels, minlength=len(classes)).double()
        out["per_class_top1"] = {classes[c]: 100.0 * float(per[c] / seen[c]) for c in range(len(classes))
                                 if seen[c] > 0}
    return out
