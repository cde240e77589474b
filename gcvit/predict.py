"""Classify images with any GC ViT checkpoint the trainer can load (ours, official NVlabs, timm).

    python -m gcvit.predict CHECKPOINT IMAGE_OR_DIR... [--topk 5] [--img-size N] [--json]

CHECKPOINT is a file or a name (timm:gcvit_tiny.in1k, hf-hub:ORG/REPO: gcvit.models.hub).

The architecture is read off the file's tensor shapes; images go through the val transform of training
(shorter side to img_size / crop_pct, center crop, ImageNet normalisation). Class names: our checkpoints'
own; ImageNet-1K's (timm's ImageNetInfo) for 1000-class foreign files; else the class index.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from gcvit.engine.pretrained import BEST, WEIGHTS, Pretrained, read
from gcvit.models.checkpoint import CheckpointError, infer_config, load_checkpoint
from gcvit.models.gcvit import GCViT
from gcvit_data.index import IMAGE_EXTENSIONS, BadImage, Index
from gcvit_data.loaders import normalize_on
from gcvit_data.torch_loader import ImageDataset


def build(src: Pretrained, img_size: int | None = None) -> GCViT:
    """The checkpoint's architecture at its own resolution, or at `img_size` with every window scaled alike
    (224 -> 384 turns windows 7, 7, 14, 7 into 12, 12, 24, 12) and the bias tables resampled to them."""
    cfg = infer_config(src.state)
    trained_at = (src.config or {}).get("model", {}).get("img_size") or cfg["img_size"]
    size = img_size or trained_at
    windows = [w * size / trained_at for w in cfg["window_size"]]
    if any(w != int(w) for w in windows):
        step = trained_at // math.gcd(trained_at, *cfg["window_size"])
        raise CheckpointError(f"--img-size {size} scales the windows {cfg['window_size']} of "
                                  f"{trained_at} px to {windows}; pick a size that keeps them whole (a "
                                  f"multiple of {step})")
    cfg.update(img_size=size, window_size=tuple(int(w) for w in windows))
    model = GCViT(**cfg)
    load_checkpoint(model, src.state)
    return model.eval()


def class_names(src: Pretrained, num_classes: int) -> list[str]:
    """Our checkpoint's class names, ImageNet-1K's for a 1000-class foreign file, else the indices."""
    if src.classes and len(src.classes) == num_classes:
        return list(src.classes)
    if num_classes == 1000 and src.classes is None:
        from timm.data import ImageNetInfo

        info = ImageNetInfo("imagenet-1k")
        return [info.index_to_description(i).split(",")[0] for i in range(num_classes)]
    return [str(i) for i in range(num_classes)]


def find_images(paths: list[str]) -> list[Path]:
    """The files given and the images under the directories given (sorted), or a one-line SystemExit."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise SystemExit(f"error: {p} does not exist; pass image files or directories of images")
    if not out:
        raise SystemExit(f"error: no images (*{', *'.join(IMAGE_EXTENSIONS)}) under {', '.join(paths)}")
    return out


def predict(model: GCViT, images: list[Path], *, topk: int, batch_size: int, crop_pct: float,
            interpolation: str, device: torch.device) -> Iterator[tuple[Path, list[int], list[float]]]:
    """(image, top-k class indices, their probabilities) per image, in batches."""
    index = Index(Path("/"), [], [str(p.resolve()) for p in images], [0] * len(images))
    data = ImageDataset(index, None, model.img_size, crop_pct, seed=0, interpolation=interpolation)
    model = model.to(device)
    k = min(topk, model.num_classes)
    for start in range(0, len(images), batch_size):
        ids = range(start, min(start + batch_size, len(images)))
        try:
            x = torch.stack([data[(0, i)][0] for i in ids])
        except BadImage as e:
            raise SystemExit(f"error: {e}") from None
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            probs = model(normalize_on(x, device, torch.float32)).float().softmax(-1)
        top = probs.topk(k, dim=-1)
        for j, i in enumerate(ids):
            yield images[i], top.indices[j].tolist(), top.values[j].tolist()


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(prog="python -m gcvit.predict", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a gcvit-train run checkpoint, official/timm/native weights, or a "
                   "name timm:MODEL.TAG / hf-hub:ORG/REPO (fetched into its cache)")
    p.add_argument("images", nargs="+", help="image files and/or directories (searched recursively)")
    p.add_argument("--topk", type=int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the checkpoint's)")
    p.add_argument("--weights", choices=(BEST, *WEIGHTS), default=BEST,
                   help="from a run checkpoint: best (default: the set that earned its best top-1, else the "
                   "EMA), its EMA (when present) or raw model weights")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    args = p.parse_args(argv)
    if args.topk < 1:
        p.error("--topk must be >= 1")
    images = find_images(args.images)
    try:
        src = read(args.checkpoint, args.weights, what="checkpoint")
        model = build(src, args.img_size)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(src.choice, file=sys.stderr, flush=True)  # stderr: stdout holds only the predictions (--json)
    names = class_names(src, model.num_classes)
    data_cfg = (src.config or {}).get("data", {})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for path, idx, prob in predict(model, images, topk=args.topk, batch_size=args.batch_size,
                                   crop_pct=data_cfg.get("crop_pct", model.pretrained_cfg["crop_pct"]),
                                   interpolation=data_cfg.get("interpolation", "bicubic"), device=device):
        if args.json:
            top = [{"index": i, "name": names[i], "prob": round(q, 6)} for i, q in zip(idx, prob)]
            print(json.dumps({"image": str(path), "top": top}), flush=True)
        else:
            print(f"{path}: " + ", ".join(f"{names[i]} {q:.3f}" for i, q in zip(idx, prob)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
