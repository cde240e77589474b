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
from pathlib import Path

import torch

from gcvit.models.checkpoint import CheckpointLoadError
from gcvit.models.from_file import WEIGHTS, LoadedModel, example_batch, model_from_file

TARGETS = ("onnx", "torchscript", "exported")
Runner = Callable[[torch.Tensor], torch.Tensor]


class ExportError(RuntimeError):
    """The artefact could not be made or does not reproduce PyTorch; the message is one line."""


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


def export(loaded: LoadedModel, out: Path, *, to: str = "onnx", opset: int = 18, dynamic_batch: bool = True,
           check_batch: int = 4, tolerance: float = 1e-4) -> dict[str, object]:
    """Write `out`, rerun it against PyTorch and write its preprocessing JSON; returns the report."""
    if to == "exported" and out.suffix != ".pt2":
        raise ExportError(f"{out}: torch.export archives must end in .pt2 (torch.export.load refuses others)")
    model, size = loaded.model.float().eval(), loaded.preprocessing.img_size
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
    p.add_argument("checkpoint", type=Path, help="official, timm, native or gcvit-train run checkpoint")
    p.add_argument("out", type=Path, help="file to write (model.onnx, model.ts, model.pt2)")
    p.add_argument("--to", choices=TARGETS, default="onnx", help="artefact kind (default onnx)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the checkpoint's)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--dynamic-batch", action=argparse.BooleanOptionalAction, default=True,
                   help="batch axis left free (default) or fixed to --check-batch")
    p.add_argument("--weights", choices=WEIGHTS, default="auto",
                   help="for run checkpoints: ema or model (auto: EMA when the run kept one)")
    p.add_argument("--check-batch", type=int, default=4, help="second batch size the check runs (default 4)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |logit diff| allowed (default 1e-4)")
    args = p.parse_args(argv)
    try:
        loaded = model_from_file(args.checkpoint, img_size=args.img_size, weights=args.weights)
        report = export(loaded, args.out, to=args.to, opset=args.opset, dynamic_batch=args.dynamic_batch,
                        check_batch=args.check_batch, tolerance=args.tolerance)
    except (CheckpointLoadError, ExportError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    diffs = ", ".join(f"batch {n}: {d:.2e}" for n, d in report["max_abs_logit_diff"].items())
    weights = "state dict" if report["weights"] == "weights" else f"{report['weights']} weights"
    print(f"exported {report['variant']} ({weights}, {report['img_size']} px) -> {args.out}")
    print(f"max |logit diff| vs PyTorch: {diffs} (tolerance {args.tolerance:g}); "
          f"preprocessing: {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
