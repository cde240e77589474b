"""Node-local staging of a pack (data.cache_dir): copy it to local disk once per node, verified, then read
the copy.

On HDD-backed Lustre or an object store mounted through FUSE, even one pread per image costs a round trip
to shared storage every epoch; a node's local NVMe serves the same bytes at its own rate. Every process of
the node calls stage(): the first takes an exclusive file lock and copies, the others wait on the lock and
then find the copy finished. Each shard's sha256 is checked while it is copied, against the pack's
manifest; a file appears in the copy under its name only once it is complete (and verified), and the copy
is marked finished last, so a killed copy is resumed, never used half-done. A finished copy is reused by
later runs and requeued jobs, as long as the pack's manifest is unchanged (its hash names the copy).
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
from gcvit_data.shards import MANIFEST, read_manifest

DONE = ".staged"  # written into the copy once every file is in place
BLOCK = 1 << 24


def staged_path(pack: Path, cache_dir: Path) -> Path:
    """Where `pack` is copied to: its name and a hash of its manifest (a repack is a new copy)."""
    key = hashlib.sha256((pack / MANIFEST).read_bytes()).hexdigest()[:16]
    return cache_dir / f"{pack.name}-{key}"


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
        raise DataError(f"{src} does not match the sha256 in {src.parent / MANIFEST} (copy to {dst} "
                        f"abandoned); run python -m gcvit_data.verify {src.parent}")
    os.replace(tmp, dst)


def stage(pack: str | Path, cache_dir: str | Path, verbose: bool = True) -> Path:
    """The node-local copy of `pack` under `cache_dir`, made now if no finished one exists."""
    pack, cache_dir = Path(pack).expanduser().resolve(), Path(cache_dir).expanduser().resolve()
    manifest = read_manifest(pack)
    dest = staged_path(pack, cache_dir)
    if (dest / DONE).is_file():
        if verbose:
            print(f"data.cache_dir: reading {dest} (the local copy of {pack}, staged earlier)", flush=True)
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one copier per node; the others wait here for it to finish
        if not (dest / DONE).is_file():
            _copy_pack(pack, dest, manifest, verbose)
        elif verbose:
            print(f"data.cache_dir: reading {dest} (staged by another process of this node)", flush=True)
    return dest


def _copy_pack(pack: Path, dest: Path, manifest: dict, verbose: bool) -> None:
    sha = {f"{s['name']}.tar": s["sha256"] for split in manifest["splits"].values() for s in split["shards"]}
    names = sorted(p.name for p in pack.iterdir() if p.is_file() and not p.name.startswith("."))
    dest.mkdir(parents=True, exist_ok=True)
    todo = [n for n in names if not (dest / n).is_file()]  # files already in place are complete
    need = sum((pack / n).stat().st_size for n in todo)
    free = shutil.disk_usage(dest).free
    if need > free:
        raise DataError(f"data.cache_dir={dest.parent} has {free / 1e9:.1f} GB free but the pack {pack} "
                        f"needs {need / 1e9:.1f} GB more; free space there or unset data.cache_dir")
    start = time.perf_counter()
    for n in todo:
        _copy(pack / n, dest / n, sha.get(n))
    seconds = time.perf_counter() - start
    (dest / DONE).write_text(json.dumps({"source": str(pack), "files": len(names)}) + "\n")
    if verbose:
        rate = need / 1e6 / seconds if seconds > 0 else float("inf")
        print(f"data.cache_dir: staged {pack} -> {dest}: {len(todo)} files, {need / 1e9:.2f} GB in "
              f"{seconds:.1f} s ({rate:,.0f} MB/s), sha256 of every shard verified", flush=True)
