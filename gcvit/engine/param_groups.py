"""Which parameters train, with which weight decay and lr scale: layer-wise lr decay (optim.layer_decay)
through timm, over the depth order the model's group_matcher() defines."""
from __future__ import annotations

from timm.optim import param_groups_layer_decay
from torch import nn


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's param_groups_layer_decay: lr_scale = layer_decay ** (last layer - layer) per group, weight decay
    off for 1-d tensors and the model's no_weight_decay() names; frozen parameters are left out."""
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    return param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=sorted(no_decay),
                                    layer_decay=layer_decay)
