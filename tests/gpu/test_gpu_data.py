"""GPU tier, data: the DALI `gpu` pipelines (nvJPEG mixed decode, GPU resize and RandAugment) against the
`cpu` ones on generated JPEGs: val pixels, train geometry, bitwise mid-epoch resume, exactly-once sharding,
and images in the model's form (channels_last float16 on the GPU)."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from gcvit_data.config import IMAGENET_STD, AugConfig, DataConfig
from gcvit_data.demo import write_image_folder
from gcvit_data.loaders import Batch, build_loader

pytest.importorskip("nvidia.dali", reason="DALI is not installed (the kit installs it from carried parts)")
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255  # normalized units -> 0..255 pixel units


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 classes, 16 train and 6 val JPEGs each, sides 48..160 px (varied aspect ratios)."""
    return write_image_folder(tmp_path_factory.mktemp("jpegs"), train_per_class=16, val_per_class=6,
                              num_classes=5, sizes=(48, 160), seed=3)


def _loader(root: Path, dali_device: str, split: str, *, ra: str | None = None, rank: int = 0,
            world: int = 1, precision: str = "fp32", hw_decoder_load: float = 0.65):
    data = DataConfig(root=str(root), loader="dali", dali_device=dali_device, batch_size=8, workers=4,
                      hw_decoder_load=hw_decoder_load)
    return build_loader(data, AugConfig(rand_augment=ra), split=split, img_size=64, seed=5, rank=rank,
                        world_size=world, device=torch.device("cuda"), precision=precision)


def _all(loader) -> list[Batch]:
    return list(iter(loader))


def test_gpu_val_pixels_match_the_cpu_pipeline(root) -> None:
    """nvJPEG's IDCT and DALI's GPU resize against libjpeg-turbo and torch's resize: mean |diff| <= 2/255."""
    for a, b in zip(_all(_loader(root, "gpu", "val")), _all(_loader(root, "cpu", "val"))):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.labels, b.labels)
        diff = ((a.images.float() - b.images.float()).abs().cpu() * STD).mean(dim=(1, 2, 3))
        assert diff.max() <= 2.0, f"mean |gpu - cpu| per image up to {diff.max():.2f}/255"


def test_gpu_train_crops_match_the_cpu_pipeline(root) -> None:
    """The same crop, flip and scale on both devices (augmentation is drawn in Python from the sample's
    own generator): the images agree to within decoder and resize rounding."""
    a, b = _loader(root, "gpu", "train"), _loader(root, "cpu", "train")
    for x, y in zip(itertools.islice(iter(a), 4), itertools.islice(iter(b), 4)):
        assert torch.equal(x.ids, y.ids)
        diff = ((x.images.float() - y.images.float()).abs().cpu() * STD).mean(dim=(1, 2, 3))
        assert diff.max() <= 3.0, f"mean |gpu - cpu| per image up to {diff.max():.2f}/255"


@pytest.mark.parametrize("ra", [None, "rand-m9-mstd0.5-inc1"])
def test_gpu_resume_mid_epoch_is_bitwise(root, ra) -> None:
    a = _loader(root, "gpu", "train", ra=ra)
    a.set_epoch(1)
    it = iter(a)
    list(itertools.islice(it, 3))
    state = a.state_dict()
    ref = list(itertools.islice(it, 3))
    b = _loader(root, "gpu", "train", ra=ra)
    b.set_epoch(1)
    b.load_state_dict(state)
    for x, y in zip(itertools.islice(iter(b), 3), ref):
        assert torch.equal(x.ids, y.ids) and torch.equal(x.images, y.images)


def test_gpu_sharding_is_exactly_once(root) -> None:
    seen = [int(i) for r in range(2) for batch in _all(_loader(root, "gpu", "val", rank=r, world=2))
            for i in batch.ids]
    assert sorted(seen) == list(range(30))


def test_gpu_images_arrive_in_the_model_s_form(root) -> None:
    batch = next(iter(_loader(root, "gpu", "train", precision="bf16")))
    assert batch.images.device.type == "cuda" and batch.images.dtype == torch.float16
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.labels.device.type == "cuda" and batch.labels.dtype == torch.int64


@pytest.mark.parametrize("dali_device", ["gpu", "cpu"])
def test_copies_are_queued_on_the_training_thread_s_stream(root, dali_device: str) -> None:
    """The runner thread queues each batch's device copies on the stream the consumer runs on: a consumer on
    a side stream gets, without any synchronisation of its own, the batches a default-stream consumer gets."""
    ref = _all(_loader(root, dali_device, "val"))
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        got = [(b.images.sum(), b.labels.clone()) for b in _all(_loader(root, dali_device, "val"))]
    side.synchronize()
    for (total, labels), want in zip(got, ref, strict=True):
        assert torch.equal(total, want.images.sum()) and torch.equal(labels, want.labels)


def test_hardware_decoder_share_changes_no_pixel_beyond_rounding(root) -> None:
    """data.hw_decoder_load sends JPEGs to the GPU's hardware decoder (A100/H100/H200) or to nvJPEG's CUDA
    decoder: either way the val images agree within the decoders' rounding."""
    for a, b in zip(_all(_loader(root, "gpu", "val", hw_decoder_load=0.0)),
                    _all(_loader(root, "gpu", "val", hw_decoder_load=1.0)), strict=True):
        assert torch.equal(a.ids, b.ids)
        diff = ((a.images.float() - b.images.float()).abs().cpu() * STD).mean(dim=(1, 2, 3))
        assert diff.max() <= 2.0, f"mean |hw - cuda| per image up to {diff.max():.2f}/255"
