"""Node-local staging of shards (data.cache_dir): copy a pack or WebDataset shards to local disk once per
node, verified, then read the copy.

On HDD-backed Lustre or an object store mounted through FUSE, even one pread per image costs a round trip
to shared storage every epoch; a node's local NVMe serves the same bytes at its own rate. Every process of
the node calls stage(): the first takes an exclusive file lock and copies, the others wait on the lock and
then find the copy finished. Each shard's sha256 is checked while it is copied, against the pack's
manifest (WebDataset shards record none: they are copied unchecked); a file appears in the copy under its
name only once it is complete (and verified), and the copy is marked finished last, so a killed copy is
resumed, never used half-done. A finished copy is reused by
later runs and requeued jobs, as long as the source is unchanged (the hash of its manifest, or of the
WebDataset shards' names and sizes, names the copy; gcvit_data.readers.stage_plan).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from gcvit_data.index import DataError
from gcvit_data.readers import stage_plan

DONE = ".staged"  # written into the copy once every file is in place
BLOCK = 1 << 24


def _target(root: Path, cache_dir: Path) -> tuple[Path, dict[str, str | None]]:
    """Where `root` is copied to (its name and a hash of the source: a repack is a new copy) and each
    shard's sha256 (None where the layout records none)."""
    plan = stage_plan(root)
    if plan is None:
        raise DataError(f"data.cache_dir={cache_dir} stages packs and WebDataset shards only, and "
                        f"data.root={root} is an image folder; pack it (python -m gcvit_data.pack ROOT OUT) "
                        "or unset data.cache_dir")
    return cache_dir / f"{root.name}-{plan[0]}", plan[1]


def _copy(src: Path, dst: Path, sha256: str | None) -> None:
    """Copy src to dst through dst's temporary name, hashing as it goes; a mismatch leaves nothing."""
    tmp = dst.with_name(f".{dst.name}.partial")
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        while block := fi.read(BLOCK):
            h.update(block)
            fo.write(block)
        fo.flush()
        os.fsync(fo.fileno())
    if sha256 is not None and h.hexdigest() != sha256:
        tmp.unlink()
        raise DataError(f"{src} does not match the sha256 in {src.parent / 'pack.json'} (copy to {dst} "
                        f"abandoned); run python -m gcvit_data.verify {src.parent}")
    os.replace(tmp, dst)


def stage(root: str | Path, cache_dir: str | Path, verbose: bool = True) -> Path:
    """The node-local copy of the shards at `root` under `cache_dir`, made now if no finished one exists."""
    root, cache_dir = Path(root).expanduser().resolve(), Path(cache_dir).expanduser().resolve()
    dest, sha = _target(root, cache_dir)
    if (dest / DONE).is_file():
        if verbose:
            print(f"data.cache_dir: reading {dest} (the local copy of {root}, staged earlier)", flush=True)
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one copier per node; the others wait here for it to finish
        if not (dest / DONE).is_file():
            _copy_all(root, dest, sha, verbose)
        elif verbose:
            print(f"data.cache_dir: reading {dest} (staged by another process of this node)", flush=True)
    return dest


def _copy_all(pack: Path, dest: Path, sha: dict[str, str | None], verbose: bool) -> None:
    """Every file of the source folder `pack` (its hidden ones aside) into `dest`, each shard checked by
    `sha`."""
    names = sorted(p.name for p in pack.iterdir() if p.is_file() and not p.name.startswith("."))
    dest.mkdir(parents=True, exist_ok=True)
    todo = [n for n in names if not (dest / n).is_file()]  # files already in place are complete
    need = sum((pack / n).stat().st_size for n in todo)
    free = shutil.disk_usage(dest).free
    if need > free:
        kind = "pack" if all(sha.values()) else "WebDataset shards"
        raise DataError(f"data.cache_dir={dest.parent} has {free / 1e9:.1f} GB free but the {kind} {pack} "
                        f"needs {need / 1e9:.1f} GB more; free space there or unset data.cache_dir")
    start = time.perf_counter()
    for n in todo:
        _copy(pack / n, dest / n, sha.get(n))
    seconds = time.perf_counter() - start
    (dest / DONE).write_text(json.dumps({"source": str(pack), "files": len(names)}) + "\n")
    if verbose:
        rate = need / 1e6 / seconds if seconds > 0 else float("inf")
        checked = ("sha256 of every shard verified" if all(sha.values())
                   else "unchecked: WebDataset shards carry no checksums")
        print(f"data.cache_dir: staged {pack} -> {dest}: {len(todo)} files, {need / 1e9:.2f} GB in "
              f"{seconds:.1f} s ({rate:,.0f} MB/s), {checked}", flush=True)
