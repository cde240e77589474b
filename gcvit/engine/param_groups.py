"""Which parameters train, with which weight decay and lr scale: plain weight-decay groups, or layer-wise lr
decay (optim.layer_decay) through timm over the depth order the model's group_matcher() defines."""
from __future__ import annotations

from timm.models import group_parameters
from timm.optim import param_groups_layer_decay
from torch import nn

from gcvit.config import FREEZE


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and undecayed norms/biases/rel-pos tables (1-d or named by the model's
    no_weight_decay()); frozen parameters are left out."""
    skip = _no_decay(model)
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # The model lists its own exceptions (rel-pos tables are 2-d); 1-d tensors are norms and biases.
        named = name in skip or any(name.endswith("." + s) or name.startswith(s + ".") for s in skip)
        if p.ndim <= 1 or named:
            plain.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's param_groups_layer_decay: lr_scale = layer_decay ** (last layer - layer) per group, weight decay
    off for 1-d tensors and the model's no_weight_decay() names; frozen parameters are left out."""
    return param_groups_layer_decay(model, weight_decay=weight_decay,
                                    no_weight_decay_list=sorted(_no_decay(model)), layer_decay=layer_decay)


def _no_decay(model: nn.Module) -> set[str]:
    """The names the model keeps out of weight decay (timm's no_weight_decay() convention)."""
    return set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()


def describe_layer_decay(model: nn.Module, layer_decay: float) -> str:
    """The one line a run prints about optim.layer_decay."""
    layers = max(group_parameters(model, model.group_matcher(), reverse=True).values()) + 1
    return (f"layer decay {layer_decay}: {layers} layers (stem, each block, head); lr x "
            f"{layer_decay ** (layers - 1):.3g} at the stem rising to x 1 at the head")


def _depth_level(model: nn.Module, name: str) -> int:
    """0 for the stem, k for stage k (with the downsampler that ends it), 5 for the final norm and head."""
    ordinal = model.group_matcher(coarse=True)(name)
    return 0 if ordinal[0] == 0 else 5 if len(ordinal) == 1 else int(ordinal[1]) + 1


def freeze(model: nn.Module, what: str | None) -> str | None:
    """model.freeze: stop the gradients of a prefix of the network; returns the line to print (None: unset).

    `stem` and `stageK` freeze everything up to and including it, `backbone` all but the classifier (a linear
    probe). Frozen parameters get requires_grad=False before the optimizer and DDP are built, so both leave
    them out (no update, no weight decay, no all-reduce), and the EMA of a constant is that constant. Drop
    path is switched off in frozen blocks: they are a fixed feature extractor, so random depth there would
    only add noise to the features the trainable part learns from.
    """
    if what is None:
        return None
    if what not in FREEZE:
        raise ValueError(f"freeze={what!r} is not one of {', '.join(FREEZE)}")
    last = 5 if what == "backbone" else FREEZE.index(what)
    frozen = 0
    for name, p in model.named_parameters():
        if (not name.startswith("head.") if what == "backbone" else _depth_level(model, name) <= last):
            p.requires_grad_(False)
            frozen += p.numel()
    for i, stage in enumerate(model.stages):
        if what == "backbone" or i + 1 <= last:
            for block in stage.blocks:
                block.drop_path = 0.0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"frozen ({what}): {frozen / 1e6:.2f}M parameters are neither updated nor decayed (drop path off "
            f"there); {trainable / 1e6:.2f}M train")
