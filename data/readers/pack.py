"""Pack reader: a pack written by `python -m gcvit_data.pack` (format: gcvit_data.shards) as an Index.

The pack's classes, files and labels are those of the folder it was packed from, so a sampler draws the same
images in the same order from either; each sample's bytes are one crc32c-checked pread from its shard
(~50 us for a 110 kB image, a small part of its decode), so a corrupt sample fails with its shard, offset
and original file named.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from gcvit_data.index import DataError, ShardedIndex
from gcvit_data.shards import MANIFEST, PackReader, Split, is_pack, read_manifest


def detect(root: Path) -> bool:
    """A finished pack: its manifest exists (a crashed pack never publishes one)."""
    return is_pack(root)


def load(root: Path, split: str, *, index_cache: str | None = None,
         index_dir: str | None = None) -> ShardedIndex:
    """The index of `split` of the pack at `root`, its shard files open (index_cache: unused, no scan)."""
    if index_dir:
        raise DataError(f"data.index_dir applies to image folders, and data.root {root} is a pack; "
                        "drop data.index_dir (pack a clean index: gcvit_data.pack --index-dir)")
    sp = Split.load(root, split)
    reader = PackReader(sp, check=True)
    reader.open_all()
    return ShardedIndex(Path(sp.source), sp.classes, sp.files, sp.samples["label"].tolist(), reader)


def stage_plan(root: Path) -> tuple[str, dict[str, str | None]]:
    """What data.cache_dir copies: the name of the copy (a repack is a new copy) and each shard's sha256."""
    manifest = read_manifest(root)
    sha = {f"{s['name']}.tar": s["sha256"] for sp in manifest["splits"].values() for s in sp["shards"]}
    return hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()[:16], sha
