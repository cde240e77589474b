"""Export a GC ViT checkpoint for deployment (ONNX, TorchScript or torch.export) and prove the artefact.

The exported graph is run on the same random batches as the PyTorch model, at batch 1 and at another
batch size, and the export fails unless the logits agree within --tolerance (fp32). The preprocessing a
deployer needs (resolution, crop, interpolation, mean/std, class names) is written beside it as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gcvit.engine.pretrained import BEST, WEIGHTS, Pretrained, read
from gcvit.models.checkpoint import CheckpointError, describe
from gcvit.models.gcvit import GCViT
from gcvit.predict import build
from gcvit_data.config import IMAGENET_MEAN, IMAGENET_STD

TARGETS = ("onnx", "torchscript", "exported")
Runner = Callable[[torch.Tensor], torch.Tensor]


class ExportError(RuntimeError):
    """The artefact could not be made or does not reproduce PyTorch; the message is one line."""


@dataclass
class Preprocessing:
    """What a deployer must do to an image before the model sees it (timm's eval transform)."""

    img_size: int  # square input side
    crop_pct: float = 0.875  # resize the shorter side to img_size / crop_pct, then center crop
    interpolation: str = "bicubic"  # resize filter
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # of RGB in [0, 1]
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    class_names: list[str] | None = None  # index -> name, when the checkpoint carries them


@dataclass
class Loaded:
    """The model in eval mode, where its weights came from, and its preprocessing."""

    model: GCViT
    variant: str  # e.g. "gcvit_tiny (dim 64, depths (3, 4, 19, 5), ...)"
    weights: str  # ema | model | plain (a bare state dict)
    preprocessing: Preprocessing
    choice: str = ""  # one line: which weights of the file, and why

    def summary(self) -> dict[str, object]:
        return {"variant": self.variant, "weights": self.weights, **asdict(self.preprocessing)}


def load(path: str | Path, *, img_size: int | None = None, weights: str = BEST) -> Loaded:
    """The GC ViT a checkpoint holds (its architecture read off the shapes), at `img_size` or its own,
    with the crop and interpolation of the run that trained it (timm's ImageNet defaults otherwise)."""
    src: Pretrained = read(path, weights, what="checkpoint")
    model = build(src, img_size)
    data = (src.config or {}).get("data") or {}
    prep = Preprocessing(img_size=model.img_size, crop_pct=data.get("crop_pct", 0.875),
                         interpolation=data.get("interpolation", "bicubic"), class_names=src.classes)
    return Loaded(model, describe(src.state), src.weights, prep, src.choice)


def example_batch(n: int, img_size: int, seed: int = 0) -> torch.Tensor:
    """A reproducible input batch, the same for both runtimes of a comparison."""
    return torch.randn(n, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))


def _batch_dim(dynamic: bool) -> dict[str, dict[int, object]] | None:
    return {"x": {0: torch.export.Dim.DYNAMIC}} if dynamic else None


def _onnx(model: torch.nn.Module, x: torch.Tensor, out: Path, opset: int, dynamic: bool) -> Runner:
    import onnx
    import onnxruntime as ort

    torch.onnx.export(model, (x,), str(out), dynamo=True, opset_version=opset, input_names=["images"],
                      output_names=["logits"], dynamic_shapes=_batch_dim(dynamic), external_data=False,
                      verbose=False)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: torch.from_numpy(session.run(None, {name: batch.numpy()})[0])


def _torchscript(model: torch.nn.Module, x: torch.Tensor, out: Path, opset: int, dynamic: bool) -> Runner:
    with warnings.catch_warnings():  # TorchScript is deprecated upstream; users who need it know that
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, (x,)), str(out))
        loaded = torch.jit.load(str(out))
    return lambda batch: loaded(batch)


def _exported(model: torch.nn.Module, x: torch.Tensor, out: Path, opset: int, dynamic: bool) -> Runner:
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=_batch_dim(dynamic)), str(out))
    loaded = torch.export.load(str(out)).module()
    return lambda batch: loaded(batch)


_EXPORTERS = {"onnx": _onnx, "torchscript": _torchscript, "exported": _exported}


def export(loaded: Loaded, out: Path, *, to: str = "onnx", opset: int = 18, dynamic_batch: bool = True,
           check_batch: int = 4, tolerance: float = 1e-4) -> dict[str, object]:
    """Write `out`, rerun it against PyTorch and write its preprocessing JSON; returns the report."""
    if to == "exported" and out.suffix != ".pt2":
        raise ExportError(f"{out}: torch.export archives must end in .pt2 (torch.export.load refuses others)")
    model, size = loaded.model.float().eval(), loaded.preprocessing.img_size
    for param in model.parameters():
        # plain memory: the training layouts (channels_last kernels, heads-major rel-pos tables: what DDP's
        # gradient buckets want) mean nothing to an artefact, and torch.export's archive warns about them
        param.data = param.data.contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    batches = [1, check_batch] if dynamic_batch else [check_batch]
    with torch.no_grad():
        try:
            run = _EXPORTERS[to](model, example_batch(batches[-1], size), out, opset, dynamic_batch)
        except Exception as e:  # exporters raise many types; the user needs the first line and the target
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ExportError(f"--to {to} failed for {loaded.variant}: {type(e).__name__}: {first}") from None
        diffs = {}
        for n in batches:
            x = example_batch(n, size, seed=n)
            diffs[n] = float((run(x).float() - model(x)).abs().max())
    report = {"artefact": str(out), "to": to, "opset": opset if to == "onnx" else None,
              "dynamic_batch": dynamic_batch, "max_abs_logit_diff": {str(n): d for n, d in diffs.items()},
              "tolerance": tolerance, **loaded.summary()}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    worst = max(diffs.values())
    if not worst <= tolerance:
        raise ExportError(f"{out} does not reproduce PyTorch: max |logit diff| {worst:.3g} > {tolerance:g} "
                          f"(batches {', '.join(map(str, diffs))}); the artefact is kept for inspection")
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(prog="python -m gcvit.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="official, timm, native or gcvit-train run checkpoint, or a name "
                   "timm:MODEL.TAG / hf-hub:ORG/REPO")
    p.add_argument("out", type=Path, help="file to write (model.onnx, model.ts, model.pt2)")
    p.add_argument("--to", choices=TARGETS, default="onnx", help="artefact kind (default onnx)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the checkpoint's)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--dynamic-batch", action=argparse.BooleanOptionalAction, default=True,
                   help="batch axis left free (default) or fixed to --check-batch")
    p.add_argument("--weights", choices=(BEST, *WEIGHTS), default=BEST,
                   help="best (default: the set that earned the run's best top-1, else the EMA), ema (model "
                   "weights where the file has no EMA) or model")
    p.add_argument("--check-batch", type=int, default=4, help="second batch size the check runs (default 4)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |logit diff| allowed (default 1e-4)")
    args = p.parse_args(argv)
    try:
        loaded = load(args.checkpoint, img_size=args.img_size, weights=args.weights)
        report = export(loaded, args.out, to=args.to, opset=args.opset, dynamic_batch=args.dynamic_batch,
                        check_batch=args.check_batch, tolerance=args.tolerance)
    except (CheckpointError, ExportError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    diffs = ", ".join(f"batch {n}: {d:.2e}" for n, d in report["max_abs_logit_diff"].items())
    weights = "state dict" if report["weights"] == "plain" else f"{report['weights']} weights"
    print(loaded.choice)
    print(f"exported {report['variant']} ({weights}, {report['img_size']} px) -> {args.out}")
    print(f"max |logit diff| vs PyTorch: {diffs} (tolerance {args.tolerance:g}); "
          f"preprocessing: {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
