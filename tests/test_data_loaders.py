"""build_loader on generated JPEGs: bitwise resume, world-size independence, drained passes, bad input."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from gcvit_data.config import AugConfig, DataConfig
from gcvit_data.demo import ensure_demo_dataset, write_image_folder
from gcvit_data.index import DataError
from gcvit_data.loaders import Batch, build_loader

CPU = torch.device("cpu")
RA = "rand-m9-mstd0.5-inc1"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes; 13 train and 5 val images each, every side drawn from 24..80 px (varied aspect ratios)."""
    return write_image_folder(tmp_path_factory.mktemp("jpegs"), train_per_class=13, val_per_class=5,
                              num_classes=4, sizes=(24, 80), seed=1)


def _loader(root: Path, kind: str, *, split: str = "train", batch: int = 4, rank: int = 0, world: int = 1,
            ra: str | None = None, workers: int = 1, precision: str = "fp32"):
    data = DataConfig(root=str(root), loader=kind, batch_size=batch, workers=workers, prefetch=2)
    return build_loader(data, AugConfig(rand_augment=ra), split=split, img_size=24, seed=7, rank=rank,
                        world_size=world, device=CPU, precision=precision)


def _take(loader, n: int | None = None) -> list[Batch]:
    return list(itertools.islice(iter(loader), n))


def _assert_same(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.ids, y.ids) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.images, y.images)  # bitwise


@pytest.mark.parametrize("kind,ra", [("dali", RA), ("torch", RA), ("dali", None)])
def test_resume_mid_epoch_is_bitwise_identical(root: Path, kind: str, ra: str | None) -> None:
    a = _loader(root, kind, ra=ra)
    a.set_epoch(1)
    it = iter(a)
    head = list(itertools.islice(it, 3))
    state = a.state_dict()
    assert state["position"] == 12 and state["epoch"] == 1
    ref = list(itertools.islice(it, 3))

    b = _loader(root, kind, ra=ra)
    b.set_epoch(1)  # what the trainer does before restoring
    b.load_state_dict(state)
    _assert_same(_take(b, 3), ref)

    c = _loader(root, kind, ra=ra)  # negative control: the same loader without the restored state
    c.set_epoch(1)
    again = _take(c, 3)
    _assert_same(again, head)
    assert not torch.equal(again[0].images, ref[0].images)


def test_augmentation_depends_on_the_sample_not_on_rank_or_batch(root: Path) -> None:
    """1 rank x 4 (1 thread) and 2 ranks x 2 (2 threads) give bitwise equal images per id; 2 ranks resume
    a 1-rank state."""
    one = _loader(root, "dali", batch=4, ra=RA)
    one.set_epoch(0)
    ref = {int(i): (x, y) for b in _take(one) for i, x, y in zip(b.ids, b.images, b.labels)}
    assert len(ref) == 52 - 52 % 4
    state = {"epoch": 0, "position": 8, "seed": 7, "num_samples": 52}
    for rank in range(2):
        two = _loader(root, "dali", batch=2, rank=rank, world=2, ra=RA, workers=2)  # 2 DALI threads
        two.set_epoch(0)
        two.load_state_dict(state)
        for b in _take(two):
            for i, x, y in zip(b.ids.tolist(), b.images, b.labels):
                assert torch.equal(x, ref[i][0]) and y == ref[i][1]
    first_two_steps = {int(i) for b in _take(one, 2) for i in b.ids}
    assert first_two_steps.isdisjoint(_seen_after(root, state))


def _seen_after(root: Path, state: dict) -> set[int]:
    seen = set()
    for rank in range(2):
        two = _loader(root, "torch", batch=2, rank=rank, world=2, workers=0)
        two.set_epoch(0)
        two.load_state_dict(state)
        seen |= {int(i) for b in _take(two) for i in b.ids}
    return seen


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_abandoned_pass_does_not_leak_into_the_next_epoch(root: Path, kind: str) -> None:
    a = _loader(root, kind)
    a.set_epoch(0)
    _take(a, 1)  # the trainer stops an epoch early when len() is not a multiple of the accumulation
    a.set_epoch(1)
    fresh = _loader(root, kind)
    fresh.set_epoch(1)
    _assert_same(_take(a), _take(fresh))


@pytest.mark.parametrize("split", ["train", "val"])
def test_batches_held_by_the_caller_are_never_overwritten(root: Path, split: str) -> None:
    """The dali loader hands out DALI's own output buffers (no copy): later batches must not reuse them."""
    loader = _loader(root, "dali", split=split, ra=RA if split == "train" else None, workers=2)
    held, snapshots = [], []
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            held.append(batch)
            snapshots.append([t.clone() for t in batch])
    assert len(held) > 2 * loader.data.prefetch + 2
    for batch, snapshot in zip(held, snapshots):
        assert all(torch.equal(t, s) for t, s in zip(batch, snapshot))


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_val_every_image_once_over_ranks(root: Path, kind: str) -> None:
    ids, labels = [], []
    for rank in range(3):
        v = _loader(root, kind, split="val", batch=4, rank=rank, world=3)
        batches = _take(v)
        assert len(batches) == len(v)
        ids += [int(i) for b in batches for i in b.ids]
        labels += [int(y) for b in batches for y in b.labels]
        assert all(b.images.shape[1:] == (3, 24, 24) and b.images.dtype == torch.float32 for b in batches)
    assert sorted(ids) == list(range(20))
    assert [labels[ids.index(i)] for i in range(20)] == [i // 5 for i in range(20)]


def test_synthetic_loader_shapes_and_ids() -> None:
    data = DataConfig(loader="synthetic", batch_size=4, synthetic_samples=10, synthetic_classes=3)
    loader = build_loader(data, AugConfig(), split="train", img_size=16, seed=0, rank=1, world_size=2,
                          device=CPU)
    batches = _take(loader)
    assert len(batches) == len(loader) == 1 and batches[0].images.shape == (4, 3, 16, 16)
    assert torch.equal(batches[0].labels, batches[0].ids % 3)


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_unreadable_image_is_one_line_naming_the_file(tmp_path: Path, kind: str) -> None:
    root = write_image_folder(tmp_path / "bad", train_per_class=4, val_per_class=1, num_classes=2)
    victim = sorted((root / "train").rglob("*.JPEG"))[3]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated inside the header
    with pytest.raises(DataError) as err:
        _take(_loader(root, kind, batch=8))
    msg = str(err.value)
    assert str(victim) in msg and "gcvit_data.verify" in msg and "\n" not in msg


def test_bad_roots_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        _loader(tmp_path / "nowhere", "dali")
    (tmp_path / "r" / "train" / "n01").mkdir(parents=True)
    (tmp_path / "r" / "val").mkdir()
    with pytest.raises(DataError, match=r"n01 holds no images"):
        _loader(tmp_path / "r", "dali")
    bad = DataConfig(root=str(tmp_path / "r"), loader="torch", interpolation="cubic")
    (tmp_path / "r" / "train" / "n01" / "a.JPEG").write_bytes(b"")
    with pytest.raises(DataError, match="data.interpolation='cubic' is not one of bicubic"):
        build_loader(bad, AugConfig(), split="train", img_size=8, seed=0, rank=0, world_size=1, device=CPU)
    with pytest.raises(DataError, match="data.root is not set"):
        build_loader(DataConfig(root=None), AugConfig(), split="train", img_size=8, seed=0, rank=0,
                     world_size=1, device=CPU)


def test_demo_dataset_is_generated_once(tmp_path: Path) -> None:
    root = ensure_demo_dataset(tmp_path / "demo")
    train = sorted((root / "train").rglob("*.JPEG"))
    assert len(train) == 3000 and len(list((root / "val").rglob("*.JPEG"))) == 500
    assert train[0].read_bytes()[:2] == b"\xff\xd8"  # real JPEG files
    stamp = train[0].stat().st_mtime_ns
    assert ensure_demo_dataset(tmp_path / "demo") == root and train[0].stat().st_mtime_ns == stamp


def test_timm_posterize_at_magnitude_10_is_clamped_to_one_bit() -> None:
    """timm asks for 0 bits at magnitude 10, which Pillow 13 refuses; the torch loader gives 1 bit."""
    from PIL import Image, ImageOps

    from gcvit_data.torch_loader import timm_rand_augment

    ra = timm_rand_augment("rand-m10-mstd0-inc1", 32, "bicubic")
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    op.prob = 1.0
    img = Image.effect_noise((32, 32), 60).convert("RGB")
    assert op(img).tobytes() == ImageOps.posterize(img, 1).tobytes()


@pytest.mark.parametrize("kind", ["dali", "torch", "synthetic"])
def test_images_leave_the_loader_in_the_model_s_form(root: Path, kind: str) -> None:
    """channels_last NCHW (the model's layout: no copy before the stem), float16 for bf16/fp16 steps and
    float32 otherwise; the half batch is the float one rounded to float16 (the same pixels and labels)."""
    full, half = (_take(_loader(root, kind, split="val", precision=p), 2) for p in ("fp32", "bf16"))
    for a, b in zip(full, half):
        assert a.images.dtype == torch.float32 and b.images.dtype == torch.float16
        for x in (a.images, b.images):
            assert x.shape[1] == 3 and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.labels, b.labels)
        torch.testing.assert_close(b.images.float(), a.images, atol=2e-3, rtol=1e-3)
