"""Checkpoint interop: safe loading, format detection, official/timm/native key maps, rel-pos resizing."""

from __future__ import annotations

import argparse
import math
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy._core.multiarray import scalar as np_scalar
from torch import nn

from gcvit.models.gcvit import GCViT, relative_position_index
from gcvit.variants import VARIANTS

__all__ = ["CheckpointError", "safe_load", "load_error", "load_checkpoint",
           "fit_state_dict", "detect_format", "unwrap", "to_native", "from_native", "infer_config",
           "describe", "FORMATS"]

FORMATS = ("native", "timm", "official")

# What official NVlabs and timm training scripts pickle besides tensors: their argparse args and numpy
# scalars (metrics). Nothing here can run code when unpickled.
_DTYPES = [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64)]
_SAFE_GLOBALS = [argparse.Namespace, np.dtype, *_DTYPES,
                 (np_scalar, "numpy._core.multiarray.scalar"), (np_scalar, "numpy.core.multiarray.scalar")]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read or fitted to the model; one line naming the file and what to do.
    (Written: gcvit.engine.checkpoint; read and fitted: here.)"""


def safe_load(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """Read a .pth/.pt (weights_only unpickling, small allow-list) or .safetensors file onto the CPU.

    `mmap`: map the tensor data instead of reading it (a check that the file unpickles safely)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: {load_error(e)}") from e


def load_error(e: BaseException) -> str:
    """The gist of torch.load's multi-paragraph errors on one line (an unsafe object: which, and why not)."""
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(e, pickle.UnpicklingError) and m:
        return (f"it needs the Python object {m.group(1)}, and unpickling that could run arbitrary code; "
                "only tensors and plain types are loaded (re-save the state_dict from a trusted session if "
                "you trust this file)")
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    return f"{type(e).__name__}: {first}"


def unwrap(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model state dict inside a training checkpoint, without DDP/compile prefixes."""
    for key in ("state_dict", "model", "state_dict_ema", "model_ema", "ema"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def detect_format(sd: Mapping[str, Any], where: str = "the state dict") -> str:
    """'official', 'timm' or 'native' from the stem's key; CheckpointError when none fits."""
    if "patch_embed.proj.weight" in sd:
        return "official"
    if "stem.conv1.weight" in sd:
        return "timm"
    if "stem.weight" in sd:
        return "native"
    first = ", ".join(list(sd)[:3]) or "no tensors"
    raise CheckpointError(f"{where} is not a GC ViT checkpoint (no stem weights; keys start {first}); "
                              "expected the official NVlabs, timm gcvit_* or gcvit-train format")


# ---------------------------------------------------------------------------------- native -> foreign names
# Our MBConv children -> indices in the official nn.Sequential (dw conv, GELU, SE(fc.0, GELU, fc.2), pw conv)
_MBCONV_OFFICIAL = {"conv_dw": "0", "se.fc1": "2.fc.0", "se.fc2": "2.fc.2", "conv_pw": "3"}


def _timm_key(k: str) -> str:
    """Our parameter name -> timm's GlobalContextVit name."""
    k = re.sub(r"^stem\.", "stem.conv1.", k)
    k = re.sub(r"^stem_reduce\.", "stem.down.", k)
    k = re.sub(r"(down\.|downsample\.)conv\.", r"\1conv_block.", k)
    k = re.sub(r"global_query\.convs\.(\d+)\.", lambda m: f"global_block.blocks.conv{int(m[1]) + 1}.", k)
    k = re.sub(r"attn\.relative_position_bias_table", "attn.rel_pos.relative_position_bias_table", k)
    k = re.sub(r"\.gamma([12])$", r".ls\1.gamma", k)
    k = re.sub(r"^norm\.", "stages.3.norm.", k)
    return re.sub(r"^head\.", "head.fc.", k)


def _official_key(k: str) -> str:
    """Our parameter name -> the NVlabs/GCVit name (its stages end, not start, with the downsampler)."""
    k = re.sub(r"^stem\.", "patch_embed.proj.", k)
    k = re.sub(r"^stem_reduce\.", "patch_embed.conv_down.", k)
    k = re.sub(r"^stages\.(\d+)\.downsample\.", lambda m: f"levels.{int(m[1]) - 1}.downsample.", k)
    k = re.sub(r"^stages\.(\d+)\.global_query\.convs\.(\d+)\.",
               r"levels.\1.q_global_gen.to_q_global.\2.conv.", k)
    k = re.sub(r"^stages\.", "levels.", k)
    for ours, theirs in _MBCONV_OFFICIAL.items():
        k = k.replace(f".conv.{ours}.", f".conv.{theirs}.")
    return k


_KEY_FN: dict[str, Callable[[str], str]] = {
    "native": lambda k: k, "timm": _timm_key, "official": _official_key}


def _adapt(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reshape SE weights between Linear (official, ours) and 1x1 conv (timm) layouts."""
    return t.reshape(shape) if t.shape != shape and t.numel() == math.prod(shape) else t


def from_native(sd: Mapping[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Our state dict in `fmt`'s names and shapes (official files also carry the rel-pos index buffers)."""
    out = {}
    for k, v in sd.items():
        if fmt == "timm" and ".se.fc" in k:
            v = v[:, :, None, None]
        out[_KEY_FN[fmt](k)] = v
        if fmt == "official" and k.endswith("relative_position_bias_table"):
            window = (math.isqrt(v.shape[0]) + 1) // 2
            out[_KEY_FN[fmt](k).replace("bias_table", "index")] = relative_position_index(window)
    return out


def to_native(sd: Mapping[str, torch.Tensor], model: nn.Module,
              where: str = "the state dict") -> dict[str, torch.Tensor]:
    """A state dict in any format renamed/reshaped to `model`'s names; unknown keys are kept as they are."""
    fmt = detect_format(sd, where)
    own = model.state_dict()
    names = {_KEY_FN[fmt](k): k for k in own}
    out = {}
    for k, v in sd.items():
        if k.endswith("relative_position_index"):
            continue  # official persistent buffer; ours is derived from the window size
        if fmt == "official":  # early official releases had no q_global_gen level
            k = re.sub(r"^levels\.(\d+)\.to_q_global\.", r"levels.\1.q_global_gen.to_q_global.", k)
        native = names.get(k, k)
        out[native] = _adapt(v, own[native].shape) if native in own else v
    return out


# --------------------------------------------------------------------------------------- shape inspection
_BLOCK = re.compile(r"(?:stages|levels)\.(\d+)\.blocks\.(\d+)\.")
# The stage-0 global query generator in each format; its number of MBConvs gives the image size.
_QUERY0 = re.compile(r"(?:stages|levels)\.0\.(?:global_query\.convs\.|global_block\.blocks\.conv|"
                     r"(?:q_global_gen\.)?to_q_global\.)(\d+)\.")


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """GCViT keyword arguments that reproduce the shapes of a state dict in any of the three formats."""
    stem = next(sd[k] for k in ("stem.weight", "stem.conv1.weight", "patch_embed.proj.weight") if k in sd)
    depths: dict[int, int] = {}
    heads: dict[int, int] = {}
    windows: dict[int, int] = {}
    for k, v in sd.items():
        m = _BLOCK.match(k)
        if m:
            s, b = int(m[1]), int(m[2])
            depths[s] = max(depths.get(s, 0), b + 1)
            if k.endswith("relative_position_bias_table"):
                heads[s], windows[s] = v.shape[1], (math.isqrt(v.shape[0]) + 1) // 2
    n = len(depths)
    pools = len({m[1] for m in map(_QUERY0.match, sd) if m})  # each but a lone one halves the map
    img_size = 4 * windows[0] * 2 ** pools if pools > 1 else 32 * windows[0]  # else: the default geometry
    head = next((sd[k] for k in ("head.weight", "head.fc.weight") if k in sd), None)
    fc1 = next(v for k, v in sd.items() if k.endswith("blocks.0.mlp.fc1.weight"))
    return dict(dim=stem.shape[0], in_chans=stem.shape[1], depths=tuple(depths[i] for i in range(n)),
                num_heads=tuple(heads[i] for i in range(n)), mlp_ratio=fc1.shape[0] / fc1.shape[1],
                layer_scale=1e-5 if any("gamma" in k for k in sd) else None,
                window_size=tuple(windows[i] for i in range(n)), img_size=img_size,
                num_classes=0 if head is None else head.shape[0])


def describe(sd: Mapping[str, torch.Tensor]) -> str:
    """The variant a state dict looks like, e.g. 'gcvit_small (dim 96, depths (3, 4, 19, 5), ...)'."""
    try:
        cfg = infer_config(sd)
    except (StopIteration, KeyError):
        return "an incomplete GC ViT"
    shape = (f"dim {cfg['dim']}, depths {cfg['depths']}, heads {cfg['num_heads']}, "
             f"{cfg['num_classes']} classes")
    for name, v in VARIANTS.items():
        if (v["dim"], tuple(v["depths"]), tuple(v["num_heads"]), float(v["mlp_ratio"])) == (
                cfg["dim"], cfg["depths"], cfg["num_heads"], cfg["mlp_ratio"]):
            return f"{name} ({shape})"
    return f"a custom GC ViT ({shape})"


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Bicubically resample a ((2w-1)^2, heads) bias table to `length` rows (a new window size)."""
    src, dst = math.isqrt(table.shape[0]), math.isqrt(length)
    grid = table.T.reshape(1, -1, src, src).float()
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return grid.reshape(-1, dst * dst).T.to(table.dtype)


def fit_state_dict(obj: Mapping[str, Any], model: GCViT, where: str = "the state dict") -> dict:
    """Any-format checkpoint object -> `model`'s exact state dict, or one CheckpointError line."""
    raw = unwrap(obj)
    sd = to_native(raw, model, where)
    own = model.state_dict()
    for k, v in sd.items():
        if k.endswith("relative_position_bias_table") and k in own and v.shape != own[k].shape:
            sd[k] = _resize_rel_pos(v, own[k].shape[0])
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own
             if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        found = (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
        parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in found if keys]
        theirs, ours = describe(raw), describe(own)
        hint = ("the shapes agree, so the names come from an unknown code base" if theirs == ours else
                f"the model is {ours}; create the variant the checkpoint has (num_classes too)")
        raise CheckpointError(f"{where} does not fit this model ({'; '.join(parts)}): it looks like "
                                  f"{theirs}; {hint}")
    return sd


def load_checkpoint(model: GCViT, path_or_state_dict: str | Path | Mapping[str, Any]) -> None:
    """Load an official, timm or native checkpoint into `model` strictly, resizing rel-pos tables."""
    src = path_or_state_dict
    if isinstance(src, (str, Path)):
        model.load_state_dict(fit_state_dict(safe_load(src), model, f"checkpoint {src}"), strict=True)
    else:
        model.load_state_dict(fit_state_dict(src, model), strict=True)
