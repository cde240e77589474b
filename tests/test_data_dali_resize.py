"""The two resize branches of the DALI pipelines agree: torch's kernel (cpu) and DALI's own (the gpu branch).

Without a GPU the gpu branch's graph (DALI resize, then the val crop by fn.slice) runs here on CPU
operators, so its geometry is checked against the branch the cpu pipelines use.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gcvit_data import dali
from gcvit_data.augment import RandAugmentSpec
from gcvit_data.config import IMAGENET_STD, AugConfig, DataConfig
from gcvit_data.dali_resize import TorchResize
from gcvit_data.demo import write_image_folder
from gcvit_data.loaders import build_loader

STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("jpegs"), train_per_class=6, val_per_class=6,
                              num_classes=3, sizes=(40, 200), seed=3)


def _batches(root: Path, split: str, dali_resize: bool) -> list:
    data = DataConfig(root=str(root), loader="dali", batch_size=6, workers=2)
    loader = build_loader(data, AugConfig(rand_augment=None), split=split, img_size=64, seed=0, rank=0,
                          world_size=1, device=torch.device("cpu"))
    if dali_resize:
        loader._torch_resize = None  # what DaliLoader passes with data.dali_device=gpu
    return list(loader)


@pytest.mark.parametrize("split", ["train", "val"])
def test_dali_resize_branch_matches_the_torch_branch(root: Path, split: str) -> None:
    ours, gpu_branch = _batches(root, split, False), _batches(root, split, True)
    assert len(ours) == len(gpu_branch) > 0
    for a, b in zip(ours, gpu_branch):
        assert torch.equal(a.ids, b.ids) and a.images.shape == b.images.shape == (6, 3, 64, 64)
        diff = ((a.images - b.images) * STD).abs().mean(dim=(1, 2, 3)) * 255
        assert diff.max() < 1.0, diff  # same crop, kernels round apart (a 1-pixel shift: 2-6)


def test_torch_resize_equals_pil_bicubic() -> None:
    """The cpu kernel is PIL's filter: antialiased downscale and plain upscale alike."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 130, 3), np.uint8)
    resize = TorchResize("bicubic", threads=2)
    for size in (32, 224):
        ours = resize.square([image], size)[0].astype(int)
        ref = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC), int)
        assert np.abs(ours - ref).max() <= 1


def test_val_crop_is_resize_then_center_crop() -> None:
    image = np.random.default_rng(1).integers(0, 256, (120, 90, 3), np.uint8)
    resize = TorchResize("bilinear", threads=1)
    out = resize.resize_crop([image], [np.array([100, 75, 13, 5], np.int32)], 64)[0]
    full = np.asarray(Image.fromarray(image).resize((75, 100), Image.Resampling.BILINEAR), int)
    assert out.shape == (64, 64, 3)
    assert np.abs(out.astype(int) - full[13:77, 5:69]).max() <= 1


@pytest.mark.parametrize("ra", [None, "rand-m9-mstd0.5-inc1"])
def test_gpu_pipelines_are_well_formed_without_a_gpu(ra: str | None) -> None:
    """Defining a DALI graph checks every operator's arguments and the device of every input, no GPU needed:
    the mixed decode, DALI's resize and crop on the GPU, RandAugment's GPU ops, normalize on the GPU."""
    kw = dict(source=lambda: None, decoder="mixed", img_size=224, interp="bicubic", torch_resize=None,
              half=True, batch_size=2, num_threads=1, device_id=0)
    spec = RandAugmentSpec.parse(ra) if ra else None
    for pipe in (dali.train_pipeline(spec=spec, **kw), dali.val_pipeline(**kw)):
        images, labels, ids = pipe._graph_out  # the defined outputs (DALI has no public accessor)
        assert images.device == "gpu" and labels.device == ids.device == "cpu"
