"""Starting weights of a run (model.pretrained): an official NVlabs, timm, native or gcvit-train checkpoint
adapted to this run's classes and resolution. An initialisation, not a resume: only weights are taken.

What changes and why, one printed line each:
- another class count (or, for our checkpoints, other class names): the classifier is re-initialised with
  timm's small init (trunc-normal std .02 times model.head_init_scale, zero bias), so the first steps do not
  push large random-head gradients into the pretrained features;
- another resolution: GC ViT's windows follow the stage resolution, so every relative-position bias table is
  resampled bicubically to the new window (the only weights whose shape the geometry sets: the global query
  generator's depth depends on resolution / window, which the default windows keep constant).
Everything else must fit exactly; a different architecture is fit_state_dict's one-line error.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.layers import trunc_normal_

from gcvit.models.checkpoint import (
    CheckpointError,
    detect_format,
    fit_state_dict,
    safe_load,
    to_native,
    unwrap,
)
from gcvit.models.gcvit import GCViT
from gcvit.models.hub import is_named, resolve

WEIGHTS = ("ema", "model")
# The default choice: the weights that scored better at the file's own evaluation (a gcvit-train checkpoint
# records it: `scored`; best.pt's is the run's best), else those that earned the run's best, else the EMA.
BEST = "best"
# Where training scripts keep each set of weights: ours (model/ema), timm's and the official repo's train.py
# (state_dict/state_dict_ema), other EMA wrappers (model_ema).
_KEYS = {"ema": ("ema", "state_dict_ema", "model_ema"), "model": ("model", "state_dict")}
_TABLE = "relative_position_bias_table"


@dataclass
class Pretrained:
    """The weights read from a checkpoint file, and what is known about them."""

    path: str  # the file read (for a Hub name: its file in the Hub cache)
    state: dict[str, torch.Tensor]  # model weights, in the file's own names (any of the three formats)
    format: str  # official | timm | native
    weights: str  # ema | model | plain (a bare state dict)
    classes: list[str] | None = None  # class names, when the file is one of our run checkpoints
    config: dict | None = None  # the run's resolved config, likewise
    notes: list[str] = field(default_factory=list)  # lines worth printing about the choice
    name: str | None = None  # the name (hf-hub:ORG/REPO or timm:MODEL.TAG) the file was fetched by, if any

    @property
    def label(self) -> str:
        """How messages name the weights: the name and its cached file, or the path."""
        return f"{self.name} ({self.path})" if self.name else self.path

    @property
    def choice(self) -> str:
        """One line: which weights of the file these are, and why when the file decided."""
        which = "a bare state dict" if self.weights == "plain" else f"its {self.weights} weights"
        return "; ".join([f"weights: {self.label}: {which}", *self.notes])


def read(path: str | Path, weights: str = BEST, what: str = "model.pretrained",
         local_rank: int = 0) -> Pretrained:
    """The model weights in `path` (a file, or a name: gcvit.models.hub): `weights` best (earned_best),
    ema (when present) or model; `what` names the setting in errors."""
    if weights not in (BEST, *WEIGHTS):
        raise CheckpointError(f"{what} weights={weights!r} are invalid; allowed: best | ema | model")
    name = str(path) if is_named(str(path)) else None
    p = Path(resolve(str(path), what, local_rank)).expanduser()
    if not p.is_file():
        raise CheckpointError(f"{what}={path}: no such file; pass an official NVlabs, timm or "
                                  "gcvit-train checkpoint (.pth/.pt/.safetensors), hf-hub:ORG/REPO or "
                                  "timm:MODEL.TAG")
    obj = safe_load(p)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{what}={path} holds a {type(obj).__name__}, not a state dict")
    found = {w: next((k for k in _KEYS[w] if isinstance(obj.get(k), Mapping)), None) for w in WEIGHTS}
    notes = []
    if found["ema"] is None and found["model"] is None:
        chosen, which = obj, "plain"
    else:
        wanted, earned = earned_best(obj) if weights == BEST else (weights, None)
        which = wanted if found[wanted] is not None else next(w for w in WEIGHTS if w != wanted)
        if which != wanted:
            notes.append(f"{p} has no {wanted.upper() if wanted == 'ema' else wanted} weights; using its "
                         f"{which.upper() if which == 'ema' else which} weights")
        elif earned:
            notes.append(earned)
        chosen = obj[found[which]]
    state = unwrap(chosen)
    classes = obj.get("classes") if isinstance(obj.get("classes"), list) else None
    config = dict(obj["config"]) if isinstance(obj.get("config"), Mapping) else None
    return Pretrained(str(p), state, detect_format(state, f"{what}={p}"), which, classes, config, notes, name)


def earned_best(obj: Mapping[str, Any]) -> tuple[str, str | None]:
    """The weights `best` means in a checkpoint, with a line that is true of this very file: the set that
    scored better at its own evaluation (`scored`; in best.pt that is the run's best); in a file saved
    between evaluations, the set that earned the run's best so far; the EMA (no line) when the file records
    no evaluation (another trainer's, or none yet)."""
    progress, scored = obj.get("progress"), obj.get("scored")
    if not isinstance(progress, Mapping):
        return "ema", None
    best = progress.get("best_top1", -1.0)
    if isinstance(scored, Mapping) and scored.get("weights") in WEIGHTS:
        which, top1 = scored["weights"], scored["top1"]
        why = (f"the {which} weights earned the run's best top-1 ({top1:.2f})" if top1 >= best else
               f"the {which} weights scored better at this checkpoint's evaluation (top-1 {top1:.2f} at step "
               f"{scored['step']}; the run's best up to then: {best:.2f}, see best.pt)")
    elif progress.get("best_weights") in WEIGHTS:
        which = progress["best_weights"]
        why = (f"this checkpoint (step {progress['step']}) records no evaluation of its own: the {which} "
               f"weights, the set that earned the run's best top-1 up to then ({best:.2f}; see best.pt)")
    else:
        return "ema", None
    return which, f"{why}; the {'model' if which == 'ema' else 'ema'} weights on request"


def stage_windows(sd: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """Window side of each stage of a native state dict, from its first block's bias table."""
    out, s = [], 0
    while f"stages.{s}.blocks.0.attn.{_TABLE}" in sd:
        out.append((math.isqrt(sd[f"stages.{s}.blocks.0.attn.{_TABLE}"].shape[0]) + 1) // 2)
        s += 1
    return tuple(out)


@torch.no_grad()
def reinit_head(model: GCViT, scale: float) -> None:
    """timm's fine-tuning head init: trunc-normal std .02 scaled by `scale`, zero bias."""
    trunc_normal_(model.head.weight, std=0.02)
    model.head.weight.mul_(scale)
    torch.nn.init.zeros_(model.head.bias)


def initialise(model: GCViT, src: Pretrained, *, head_init_scale: float,
               classes: list[str] | None = None) -> list[str]:
    """Load `src` into `model` (built with this run's class count and resolution); returns the lines to print.

    The model's parameters are written in place, so optimizer, EMA and DDP may be built before or after.
    """
    where = f"model.pretrained={src.label}"
    sd = to_native(src.state, model, where)
    own = model.state_dict()
    lines = [f"pretrained: {src.label} ({src.format} format, {src.weights} weights); an initialisation: "
             "optimizer, schedule and data start fresh", *src.notes]
    theirs = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    ours = model.num_classes
    reason = None
    if theirs != ours:
        reason = f"checkpoint has {theirs} classes, this dataset has {ours}"
    elif src.classes and classes and list(src.classes) != list(classes):
        first = next(i for i, (a, b) in enumerate(zip(src.classes, classes)) if a != b)
        reason = (f"checkpoint's {theirs} classes are not this dataset's (class {first}: "
                  f"{src.classes[first]!r} vs {classes[first]!r})")
    if reason:
        reinit_head(model, head_init_scale)
        sd.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
        lines.append(f"head re-initialised: {reason}")
    resized = [k for k in sd if k.endswith(_TABLE) and k in own and sd[k].shape != own[k].shape]
    if resized:
        lines.append(f"resolution: {len(resized)} relative-position tables resampled (bicubic) from windows "
                     f"{stage_windows(sd)} to {model.window_sizes} for {model.img_size} px")
    model.load_state_dict(fit_state_dict(sd, model, where), strict=True)
    return lines


def summary(src: Pretrained, lines: list[str]) -> dict[str, Any]:
    """What run_info.json records about the starting weights."""
    return {"path": src.path, "hub": src.name, "format": src.format, "weights": src.weights, "log": lines}


def start_from(model: GCViT, cfg: Any, classes: list[str] | None, verbose: bool,
               local_rank: int = 0) -> dict[str, Any] | None:
    """Apply model.pretrained (cfg: the ModelConfig) to a freshly built model; None when it is unset.
    A Hub name is fetched once per node (`local_rank` 0; the other ranks read the cache)."""
    if not cfg.pretrained:
        return None
    src = read(cfg.pretrained, cfg.pretrained_weights, local_rank=local_rank)
    lines = initialise(model, src, head_init_scale=cfg.head_init_scale, classes=classes)
    if verbose:
        print("\n".join(lines), flush=True)
    return summary(src, lines)
