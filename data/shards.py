"""The packed-shard format (written by `python -m gcvit_data.pack`) and positioned reads from shard files.

A pack is a folder:

    pack.json                 format, classes, checksum kind, per split: sample count and the shard
                              manifest (name, samples, first sample, bytes, sha256)
    <split>.samples.npy       one row per sample index: shard, data offset, size, label, crc32c
    <split>.files.txt         the original relative path of each sample (named in error messages)
    <split>-NNNNNN.tar        uncompressed tar in WebDataset layout: NNNNNNNNNN.jpg + NNNNNNNNNN.cls
    <split>-NNNNNN.idx        the same shard's index in DALI's wds2idx text format (fn.readers.webdataset)

Sample indices are the positions of gcvit_data.index's folder index, so a sampler draws the same images in the
same order from a pack as from the folder it was packed from.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from gcvit_data.index import BadImage, DataError

FORMAT = "gcvit-pack v1"
MANIFEST = "pack.json"
CHECKSUM = "crc32c"  # Castagnoli CRC (iSCSI, as in GCS and ext4) of the image bytes, by google-crc32c (C)
SAMPLE_DTYPE = np.dtype([("shard", "<u4"), ("offset", "<u8"), ("size", "<u4"), ("label", "<u4"),
                         ("crc32c", "<u4")])


def crc32c(data: bytes | memoryview) -> int:
    """The CRC-32C of `data` as stored in the index."""
    return google_crc32c.value(data)


def shard_name(split: str, k: int) -> str:
    """File name of shard k of a split, without the extension."""
    return f"{split}-{k:06d}"


def member_key(i: int) -> str:
    """Tar member basename of sample i (WebDataset groups the .jpg and .cls members by it)."""
    return f"{i:010d}"


def is_pack(root: str | Path) -> bool:
    """Whether `root` is a finished pack (its manifest exists; a crashed pack never publishes one)."""
    return (Path(root).expanduser() / MANIFEST).is_file()


def read_manifest(root: Path) -> dict[str, Any]:
    """pack.json, with a one-line error when it is not a pack of this format."""
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({e}); repack with python -m gcvit_data.pack") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a {FORMAT} manifest; repack with python -m gcvit_data.pack")
    return manifest


def corrupt_sample(shard: Path, offset: int, original: str, index: int, reason: str) -> str:
    """The one-line message for a sample whose bytes are not the ones packed."""
    return (f"corrupt sample {index} in {shard} at offset {offset} (packed from {original}): {reason}; "
            f"run python -m gcvit_data.verify {shard.parent} and repack or restore that shard")


@dataclass
class Split:
    """One split of a pack as the index describes it."""

    root: Path  # the pack folder
    source: str  # where the split's files were packed from (ROOT/<split>, or a tar); files are relative to it
    name: str  # train | val
    classes: list[str]  # label i is classes[i]
    shards: list[dict[str, Any]]  # manifest entries: name, samples, first, bytes, sha256
    samples: np.ndarray  # SAMPLE_DTYPE rows by sample index
    files: list[str]  # original relative paths

    @classmethod
    def load(cls, root: str | Path, split: str) -> Split:
        """Read the index of `split` (memory-mapped rows: cheap even for 1.28M samples)."""
        root = Path(root).expanduser().resolve()
        manifest = read_manifest(root)
        if split not in manifest["splits"]:
            raise DataError(f"{root} has no {split} split (it has {', '.join(manifest['splits'])}); "
                            f"pack a dataset with ROOT/{split}/<class>/ folders")
        entry = manifest["splits"][split]
        try:
            samples = np.load(root / f"{split}.samples.npy", mmap_mode="r")
            files = (root / f"{split}.files.txt").read_text().splitlines()
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read the {split} index of the pack {root} ({e}); "
                            "repack with python -m gcvit_data.pack") from None
        if not len(samples) == len(files) == entry["samples"]:
            raise DataError(f"{root}: {split} index holds {len(samples)} rows and {len(files)} file names "
                            f"but pack.json says {entry['samples']}; repack with python -m gcvit_data.pack")
        source = entry.get("source", f"{manifest['source']}/{split}")
        return cls(root, source, split, manifest["classes"], entry["shards"], samples, files)

    def __len__(self) -> int:
        return len(self.samples)

    def shard_path(self, k: int, ext: str = "tar") -> Path:
        """Path of shard k's tar (or .idx)."""
        return self.root / f"{self.shards[k]['name']}.{ext}"

    def original(self, i: int) -> str:
        """The file sample i was packed from."""
        return f"{self.source}/{self.files[i]}"


class ShardReader:
    """Random access into shard files: each opened once, one os.pread per read.

    A shard is opened at its first read, or by open_all() (the readers' load() does that, before any fork:
    the descriptors survive fork and pread keeps no file position, so DataLoader workers share them). An
    unpickled reader (a spawned DALI feeder process) opens its own, again at their first reads.
    """

    def __init__(self, paths: list[Path], hint: str) -> None:
        self.paths, self.hint = paths, hint  # hint: what to do about a shard that cannot be opened
        self._files: dict[int, Any] = {}

    def _fd(self, k: int) -> int:
        """The descriptor of shard k (BadImage with a one-line message when it cannot be opened)."""
        if k not in self._files:
            try:  # an unbuffered file object only to hold the descriptor: closed by close() or when collected
                self._files[k] = open(self.paths[k], "rb", buffering=0)  # noqa: SIM115
            except OSError as e:
                raise BadImage(f"cannot open {self.paths[k]} ({e.strerror}); {self.hint}") from None
        return self._files[k].fileno()

    def open_all(self) -> None:
        """Open every shard now (DataError naming the first that cannot be opened)."""
        try:
            for k in range(len(self.paths)):
                self._fd(k)
        except BadImage as e:
            raise DataError(str(e)) from None

    def pread(self, k: int, size: int, offset: int) -> bytes:
        """`size` bytes of shard k from `offset` (fewer where the shard ends sooner)."""
        return os.pread(self._fd(k), size, offset)

    def drop_page_cache(self) -> None:
        """Ask the kernel to forget the shards' cached pages, so the next reads come from storage."""
        if hasattr(os, "posix_fadvise"):
            self.open_all()
            for f in self._files.values():
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        """Close the shard files (a later read opens them again)."""
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_files"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _files={})


class PackReader(ShardReader):
    """A pack split's samples by sample index, crc32c-checked on read when `check` is set."""

    def __init__(self, split: Split, check: bool = False) -> None:
        super().__init__([split.shard_path(k) for k in range(len(split.shards))],
                         f"run python -m gcvit_data.verify {split.root} and restore that shard")
        self.split, self.check = split, check

    def read(self, i: int) -> bytes:
        """The original image bytes of sample i (BadImage with a one-line message when they are not)."""
        data, reason = self.read_checked(i, self.check)
        if reason:
            row = self.split.samples[i]
            raise BadImage(corrupt_sample(self.split.shard_path(int(row["shard"])), int(row["offset"]),
                                          self.split.original(i), i, reason))
        return data

    def read_checked(self, i: int, check: bool = True) -> tuple[bytes, str | None]:
        """Sample i's bytes and why they are not the packed ones (a short read; with check, the crc32c)."""
        row = self.split.samples[i]
        size = int(row["size"])
        data = self.pread(int(row["shard"]), size, int(row["offset"]))
        if len(data) != size:
            return data, f"{len(data)} of {size} bytes (the shard is truncated)"
        want = int(row["crc32c"])
        got = crc32c(data) if check else want
        return data, None if got == want else f"crc32c {got:08x}, index says {want:08x}"
