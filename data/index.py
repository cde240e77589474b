"""The reader interface: the samples of one split as every source gives them (errors: gcvit_data.errors).

A reader (gcvit_data.readers: an image folder, a file list, a pack, WebDataset shards) is an Index: the class
names in label order, and per sample id 0..n-1 a label, a name for messages (path(i)) and random access to
(encoded bytes or path, label, id) by sample(i). The sampler draws ids, so every source gets the same
exactly-once sampling; a loader asks `by_path` whether it opens the files itself or gets the bytes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gcvit_data.errors import BadImage, bad_image
from gcvit_data.errors import DataError as DataError  # re-exported: the readers take it with the interface

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


@dataclass
class Index:
    """The images of one split as files that a loader opens itself (a folder, a file list, an eval set)."""

    root: Path  # the folder the names in `files` are relative to
    classes: list[str]  # label i is classes[i] (sorted wnids of the train split)
    files: list[str]  # relative paths (inside shards: SHARD/MEMBER), named in messages
    labels: list[int]
    by_path: ClassVar[bool] = True  # sample(i) gives a path that the loader opens (False: the encoded bytes)

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        """Where sample i is, for messages (from shards: the file it was packed from, or SHARD/MEMBER)."""
        return self.root / self.files[i]

    def subset(self, ids: list[int]) -> Index:
        """Samples `ids` in that order, as the same kind of index (a shard reader's reads its shards)."""
        files, labels = [self.files[i] for i in ids], [self.labels[i] for i in ids]
        return dataclasses.replace(self, files=files, labels=labels)

    def encoded(self, i: int) -> bytes:
        """The encoded image bytes of sample i (BadImage with a one-line message when unreadable)."""
        try:
            return self.path(i).read_bytes()
        except OSError as e:
            raise BadImage(bad_image(self.path(i), e.strerror)) from None

    def sample(self, i: int) -> tuple[bytes | Path, int, int]:
        """(path, label, id) of sample i; from a shard reader (by_path False), (encoded bytes, label, id)."""
        return self.path(i) if self.by_path else self.encoded(i), self.labels[i], i


@dataclass
class ShardedIndex(Index):
    """Images stored inside shard files (a pack, WebDataset tars): each sample's bytes are one pread by
    `reader`, which opens every shard once, so a loader opens no file per image."""

    by_path: ClassVar[bool] = False
    reader: Any = None  # .read(sample id) -> bytes, BadImage naming the shard and member when they are not
    sample_ids: np.ndarray | None = None  # the reader's sample id of each entry of a subset (data.val_split)

    def subset(self, ids: list[int]) -> ShardedIndex:
        sub = super().subset(ids)
        sub.sample_ids = np.asarray(ids, np.int64) if self.sample_ids is None else self.sample_ids[ids]
        return sub

    def encoded(self, i: int) -> bytes:
        return self.reader.read(i if self.sample_ids is None else int(self.sample_ids[i]))
