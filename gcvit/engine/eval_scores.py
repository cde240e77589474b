"""Predictions over an eval set, gathered exactly once across ranks, and the scores each set's rule gives.

The one evaluation path: mode=eval (gcvit.engine.eval_mode) scores every set with predict() -> score(), and
training's epoch-end evaluation is evaluate() below, the same two on the val loader.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gcvit.engine import distributed
from gcvit.engine.distributed import DistEnv
from gcvit.engine.runtime import autocast, synchronize
from gcvit_data.eval_sets import PROTOCOLS, EvalSet

ECE_BINS = 15


@dataclass
class Predictions:
    """Per image of a set (rank 0 only), ordered by sample id, and the rate they were made at."""

    ids: torch.Tensor  # (N,) sample ids into the set's index
    top5: torch.Tensor  # (N, k) predicted class indices, best first (k = min(5, classes))
    confidence: torch.Tensor  # (N,) softmax probability of the top-1 class
    labels: torch.Tensor  # (N,) true class index
    img_per_s: float | None = None  # all ranks, each rank's first batch (compile, warm-up) left out


def loader_set(name: str, loader: Any, classes: list[str] | None,
               real: list[list[int]] | None = None) -> EvalSet:
    """The split a val loader reads as eval set `name` (val, or real with its label sets); synthetic images
    (no index) count every sample id once."""
    eset = EvalSet(name, loader.index, PROTOCOLS[name], classes=classes, real=real)
    if loader.index is None:
        eset.size = loader.sampler.num_samples
    return eset


def evaluate(model: nn.Module, loader: Any, env: DistEnv, precision: str) -> dict[str, Any]:
    """Training's evaluation: score() of predict() on the val loader, as mode=eval scores val. A collective;
    every rank gets rank 0's scores, or its error when the loader broke the exactly-once rule."""
    preds = predict(model, loader, env, precision)
    out: dict[str, Any] | str | None = None
    if preds is not None:
        try:
            out = score(loader_set("val", loader, loader.classes), preds)
        except RuntimeError as e:  # raised on every rank below: none is left waiting in a collective
            out = str(e)
    out = distributed.broadcast_object(out)
    if isinstance(out, str):
        raise RuntimeError(out)
    return out


@torch.no_grad()
def predict(model: nn.Module, loader: Any, env: DistEnv, precision: str,
            subset: list[int] | None = None) -> Predictions | None:
    """Run the set through the model on every rank; rank 0 gets every image's prediction exactly once.
    Results stay on the device until the end: no host sync per batch."""
    was_training = model.training
    model.eval()
    keep = None if subset is None else torch.tensor(subset, device=env.device)
    parts: list[tuple[torch.Tensor, ...]] = []
    start, timed = 0.0, 0
    for i, batch in enumerate(loader):
        with autocast(env.device, precision):
            logits = model(batch.images)
        logits = logits.float() if keep is None else logits.float()[:, keep]
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # ranked on logits, as in training
        conf = logits.softmax(-1).gather(1, top[:, :1]).squeeze(1)
        if keep is not None:
            top = keep[top]  # back to indices of the model's classes
        parts.append((batch.ids, top, conf, batch.labels))
        if i == 0:
            synchronize(env.device)
            start = time.perf_counter()
        else:
            timed += len(batch.ids)
    model.train(was_training)
    mine = [torch.cat([p[j] for p in parts]).cpu() for j in range(4)] if parts else []  # waits for the GPU
    seconds = time.perf_counter() - start if timed else 0.0
    gathered = distributed.gather_object((mine, timed, seconds))
    if gathered is None:
        return None
    ids, top5, conf, labels = (torch.cat([m[j] for m, _, _ in gathered if m]) for j in range(4))
    images, slowest = sum(g[1] for g in gathered), max(g[2] for g in gathered)
    order = ids.argsort()
    return Predictions(ids[order], top5[order], conf[order], labels[order],
                       images / slowest if images and slowest > 0 else None)


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
    n_index = eset.size
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
                           "count": count, "excluded": excluded, "protocol": eset.protocol,
                           "img_per_s": preds.img_per_s}
    if eset.name == "val":
        correct = preds.top5[:, 0] == preds.labels
        out["ece"] = expected_calibration_error(preds.confidence, correct)
        classes = eset.classes or [str(c) for c in range(int(preds.labels.max()) + 1)]
        per = torch.zeros(len(classes), dtype=torch.float64).index_add_(0, preds.labels, correct.double())
        seen = torch.bincount(preds.labels, minlength=len(classes)).double()
        out["per_class"] = {classes[c]: {"top1": 100.0 * float(per[c] / seen[c]), "count": int(seen[c])}
                            for c in range(len(classes)) if seen[c] > 0}
    return out


def lowest_classes(per_class: dict[str, dict[str, float]], n: int = 5) -> str:
    """'name top1% (images), ...' for the n classes with the lowest top-1 (ties: in class order)."""
    worst = sorted(per_class.items(), key=lambda kv: kv[1]["top1"])[:n]
    return ", ".join(f"{name} {r['top1']:.1f}% ({int(r['count'])})" for name, r in worst)
