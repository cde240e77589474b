"""Which reader serves a data.root: the one place where a dataset's form is decided.

Each source is one module of this package with detect(root), load(root, split, *, index_cache, index_dir)
-> gcvit_data.index.Index and, for the shard sources that data.cache_dir can copy, stage_plan(root). A new
source is one new module added to SOURCES (python -m gcvit_data.verify checks any source's samples as its
reader gives them). File lists (data.train_list, data.val_list) take the place of data.root's splits when
set (load_split).
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

from gcvit_data.config import DataConfig
from gcvit_data.index import DataError, Index
from gcvit_data.readers import folder, pack, wds
from gcvit_data.readers.file_list import read_list

SOURCES = (pack, wds, folder)  # asked in this order; an image folder is any other directory


def source_of(root: str | Path) -> ModuleType:
    """The reader module of data.root (a one-line error when it is not a directory)."""
    root = Path(root).expanduser().resolve()
    for source in SOURCES:
        if source.detect(root):
            return source
    raise DataError(f"data.root {root} does not exist or is not a directory")


def load_index(root: str | Path, split: str, *, index_cache: str | None = None,
               index_dir: str | None = None) -> Index:
    """The samples of `split` of data.root, whatever its form (an image folder, a pack, WebDataset shards)."""
    root = Path(root).expanduser().resolve()
    return source_of(root).load(root, split, index_cache=index_cache, index_dir=index_dir)


def load_split(data: DataConfig, split: str, classes: list[str] | None = None) -> Index:
    """The samples of `split` (train | val) a DataConfig names: its file list (data.train_list or
    data.val_list, whose labels must be among `classes`, the train list's) when set, else data.root's."""
    listed = data.train_list if split == "train" else data.val_list
    if listed:
        return read_list(listed, f"data.{split}_list", data.root, classes)
    return load_index(data.root, split, index_cache=data.index_cache, index_dir=data.index_dir)


def stage_plan(root: str | Path) -> tuple[str, dict[str, str | None]] | None:
    """What data.cache_dir copies of data.root (gcvit_data.staging): the name of the copy and each shard's
    sha256 (None where the layout records none); None for an image folder, which is not staged."""
    root = Path(root).expanduser().resolve()
    plan = getattr(source_of(root), "stage_plan", None)
    return plan(root) if plan else None
