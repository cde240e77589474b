"""The feeder's header reader: the same (width, height) as PIL for every kind of file, one line for junk."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gcvit_data.image_header import image_size, jpeg_size
from gcvit_data.index import DataError


def _encoded(mode: str, size: tuple[int, int], fmt: str = "JPEG", **save: object) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, fmt, **save)
    return buf.getvalue()


EXIF = Image.Exif()
EXIF[0x0112] = 6  # orientation 'rotate 90': the header size stays the stored one, as for DALI and PIL
JPEGS = {
    "baseline": _encoded("RGB", (500, 375)),
    "progressive": _encoded("RGB", (375, 500), progressive=True),
    "optimized-q30": _encoded("RGB", (333, 500), optimize=True, quality=30),
    "exif-and-icc": _encoded("RGB", (640, 480), exif=EXIF.tobytes(), icc_profile=b"\0" * 3000),
    "grayscale": _encoded("L", (97, 31)),
    "cmyk": _encoded("CMYK", (64, 48)),
    "one-pixel": _encoded("RGB", (1, 1)),
    "restart-markers": _encoded("RGB", (120, 80), restart_marker_blocks=1),
}


@pytest.mark.parametrize("kind", sorted(JPEGS))
def test_jpeg_size_equals_pil(kind: str) -> None:
    data = JPEGS[kind]
    with Image.open(io.BytesIO(data)) as img:
        assert jpeg_size(data) == img.size


@pytest.mark.parametrize("data", [b"", b"\xff\xd8", b"\xff\xd8\xff\xe0\x00", JPEGS["baseline"][:20],
                                  b"\xff\xd8\x00\x00garbage", _encoded("RGB", (8, 8), "PNG")])
def test_jpeg_walk_gives_up_rather_than_guess(data: bytes) -> None:
    assert jpeg_size(data) is None


def test_other_formats_go_to_pil() -> None:
    assert image_size(_encoded("RGB", (40, 30), "PNG"), "x.JPEG") == (40, 30)


def test_junk_is_one_line_naming_the_file() -> None:
    with pytest.raises(DataError, match=r"cannot decode bad/junk.JPEG .*gcvit_data.verify"):
        image_size(b"this is not an image", "bad/junk.JPEG")


@pytest.mark.sample
def test_every_sample_image(imagenet_sample: Path) -> None:
    files = sorted(imagenet_sample.glob("*/*.JPEG"))
    assert len(files) == 1000
    for path in files:
        with Image.open(path) as img:
            assert jpeg_size(path.read_bytes()) == img.size, path
