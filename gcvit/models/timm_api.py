"""timm's uniform model API for GC ViT: feature extraction (forward_intermediates,
prune_intermediate_layers), depth grouping (group_matcher, read by timm's layer-wise lr decay) and
pretrained_cfg (read by timm.data.resolve_data_config), so that timm's tools work on our model unchanged."""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from functools import partial

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models._features import feature_take_indices
from torch import nn

# timm's group_with_matcher merges an ordinal ending in this into the group sorted before it
_MATCH_PREV_GROUP = 99999
_STAGE_PART = re.compile(r"stages\.(\d+)\.(downsample|global_query|blocks)(?:\.(\d+))?")


class TimmApi:
    """Mixed into GCViT; reads its stem (_embed), stages, norm, feature_info and reset_classifier."""

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[float, ...]]:
        """Depth order of each parameter for timm (layer-wise lr decay, grouping): the stem first, then each
        block of each stage (coarse: each stage) in order, the downsampler with the stage it ends, as in the
        official layout (its stage's last block), and the final norm with the head last."""
        return partial(_depth_ordinal, coarse=coarse)

    @property
    def default_cfg(self) -> dict:
        """timm's older name of pretrained_cfg."""
        return self.pretrained_cfg

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's feature API: stage outputs (all, the last n if int, or the given ones) in NCHW or NHWC.

        The final norm is part of the last stage, as in timm's GC ViT, so its output is always normalised;
        the other stages have no norm of their own, which leaves `norm` nothing to apply.
        """
        fmt = getattr(output_fmt, "value", output_fmt)  # timm passes its Format enum
        if fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt={output_fmt!r}: GC ViT stage outputs are NCHW or NHWC")
        n = len(self.stages)
        take, max_index = feature_take_indices(n, indices)
        x = self._embed(x)
        feats = []
        for i, stage in enumerate(self.stages[:max_index + 1] if stop_early else self.stages):
            x = stage(x)
            if i == n - 1:
                x = self.norm(x)
            if i in take:
                feats.append(x.permute(0, 2, 3, 1) if fmt == "NHWC" else x)
        if intermediates_only:
            return feats
        return x, feats

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last index in `indices` (and with them the final norm) and the head;
        returns the absolute indices. `prune_norm` is moot: the norm goes with the last stage (timm's too)."""
        take, max_index = feature_take_indices(len(self.stages), indices)
        if max_index < len(self.stages) - 1:
            self.stages = self.stages[:max_index + 1]
            self.norm = nn.Identity()  # it was sized for the last stage's channels
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_head = True  # the head was too
        if prune_head:
            self.reset_classifier(0)
        return take


def pretrained_cfg(img_size: int, num_classes: int) -> dict:
    """timm's description of a model's input and classifier (read by timm.data.resolve_data_config)."""
    return {"input_size": (3, img_size, img_size), "fixed_input_size": True, "num_classes": num_classes,
            "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "interpolation": "bicubic",
            # timm's convention: 224-class models crop 87.5%, high-resolution fine-tunes see the whole image
            "crop_pct": 0.875 if img_size < 384 else 1.0, "pool_size": (img_size // 32,) * 2,
            "first_conv": "stem", "classifier": "head"}


def _depth_ordinal(name: str, coarse: bool) -> tuple[float, ...]:
    """Sortable position of parameter `name` in the network's depth (see GCViT.group_matcher)."""
    if name.startswith(("stem.", "stem_reduce.")):
        return (0,)
    m = _STAGE_PART.match(name)
    if m is None:
        return (math.inf,)  # norm and head
    stage, part = int(m[1]), m[2]
    if part == "downsample":
        return (1, stage - 1, _MATCH_PREV_GROUP)
    if coarse:
        return (1, stage)
    return (1, stage, int(m[3]) if part == "blocks" else 0)  # the query generator feeds block 0 first
