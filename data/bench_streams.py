"""What the data benchmarks share: the dataset root they read, an endless train stream, the default recipe,
and the folder's images written as timm-style WebDataset shards (`--format wds`; the tests build theirs
with it too)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gcvit_data.index import Index
from gcvit_data.readers import folder, source_of

FULL = "rand-m9-mstd0.5-inc1"  # the in1k recipe's RandAugment


def dataset_root(root: Path, tmp: Path) -> Path:
    """ROOT itself, or a temporary ROOT whose train/ and val/ link to a bare folder of class folders."""
    if (root / "train").is_dir() or source_of(root) is not folder:  # a pack or WebDataset shards
        return root
    tmp.mkdir(exist_ok=True)
    for split in ("train", "val"):
        (tmp / split).symlink_to(root.resolve())
    return tmp


class Endless:
    """Batches of a train loader across epoch ends."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.epoch = loader, 0
        self.it = self._restart()

    def _restart(self) -> Any:
        self.loader.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)

    def next(self) -> Any:
        try:
            return next(self.it)
        except StopIteration:
            self.it = self._restart()
            return next(self.it)


def write_wds(indices: dict[str, Index], out: Path, per_shard: int = 100000, shard_size: float = 3e9,
              prefix: str = "data") -> Path:
    """Each split's images ({timm's split name: index}), unchanged and in index order, as the tar shards
    OUT/<prefix>-<split>-NNNN.tar of <key>.jpg / <key>.cls / <key>.json samples written by the webdataset
    package's own ShardWriter (a new shard after `per_shard` samples or `shard_size` bytes), and the
    _info.json that timm's reader_wds reads; returns OUT."""
    import webdataset as wds  # the dev extra: only benchmarks and tests write shards

    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"name": prefix, "splits": {}}
    for split, ix in indices.items():
        pattern = str(out / f"{prefix}-{split}-%04d.tar")
        lengths: list[int] = []
        with wds.ShardWriter(pattern, maxcount=per_shard, maxsize=shard_size, verbose=0) as sink:
            for i in range(len(ix)):
                key = re.sub(r"[./]", "_", ix.files[i].rsplit(".", 1)[0])  # a key holds no dot
                meta = {"filename": Path(ix.files[i]).name, "label": ix.labels[i]}
                sink.write({"__key__": key, "jpg": ix.encoded(i), "cls": ix.labels[i], "json": meta})
                lengths[sink.shard - 1:] = [sink.count]  # sink.shard counts the shards opened so far
        info["splits"][split] = {"name": split, "num_samples": len(ix), "shard_lengths": lengths,
                                 "filenames": [Path(pattern % k).name for k in range(len(lengths))]}
    (out / "_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return out
