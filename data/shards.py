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

import contextlib
import errno
import json
import os
import resource
import sys
from collections import OrderedDict
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


RESERVE_FDS = 256  # descriptors left to the rest of a process (DALI, sockets, logs, the other split's shards)
RAISED_NOFILE = 65536  # the soft open-file limit asked for when the shards need more (capped by the hard one)


def open_descriptors() -> int:
    """How many file descriptors this process holds now (0 where the system does not say)."""
    for listing in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return len(os.listdir(listing)) - 1  # less the descriptor of the listing itself
    return 0


def room_for(n: int) -> int:
    """How many of `n` files this process may keep open (at least 1): where n more descriptors and
    RESERVE_FDS do not fit under the soft RLIMIT_NOFILE, it is first raised toward the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = open_descriptors()
    want = held + n + RESERVE_FDS
    if soft != resource.RLIM_INFINITY and want > soft:
        raised = max(want, RAISED_NOFILE)
        with contextlib.suppress(ValueError, OSError):  # refused (a container's cap): keep the soft limit
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (raised if hard == resource.RLIM_INFINITY else min(raised, hard), hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return n if soft == resource.RLIM_INFINITY else max(1, min(n, soft - held - RESERVE_FDS))


def nofile_limits() -> str:
    """The soft and hard open-file limits, as a message names them."""
    soft, hard = (str(v) if v != resource.RLIM_INFINITY else "unlimited"
                  for v in resource.getrlimit(resource.RLIMIT_NOFILE))
    return f"ulimit -n {soft}, hard limit {hard}"


def too_many_files(path: Path) -> str:
    """The one-line message for a shard that cannot be opened because descriptors ran out (EMFILE)."""
    return (f"cannot open {path}: too many open files (this process holds {open_descriptors()}; "
            f"{nofile_limits()}); raise the limit before training (ulimit -n 65536 in the job "
            "script; the hard limit is set by the cluster: LimitNOFILE, /etc/security/limits.conf)")


class ShardReader:
    """Random access into shard files: each opened once, one os.pread per read.

    A shard is opened at its first read, or by open_all() (the readers' load() does that, before any fork:
    the descriptors survive fork and pread keeps no file position, so DataLoader workers share them). An
    unpickled reader (a spawned DALI feeder process) opens its own, again at their first reads. Where the
    open-file limit leaves no room for every shard (timm's ImageNet is 1088 tars), the soft limit is raised
    toward the hard one; failing that, at most room_for() stay open and the least recently read is closed
    for a new one (one open per miss, counted in `opens`; one line says so).
    """

    def __init__(self, paths: list[Path], hint: str) -> None:
        self.paths, self.hint = paths, hint  # hint: what to do about a shard that cannot be opened
        self._files: OrderedDict[int, Any] = OrderedDict()
        self.max_open = 0  # shards kept open at once, set by this process's first open (0: not yet)
        self.opens = 0  # shards opened by this reader in this process (more than len(paths): reopens)

    def _room(self) -> int:
        if not self.max_open:
            self.max_open = room_for(len(self.paths))
            if self.max_open < len(self.paths):
                print(f"{self.paths[0].parent}: {len(self.paths)} shards, room for {self.max_open} open "
                      f"files in this process ({nofile_limits()}): the least recently read are closed and "
                      f"reopened as needed; ulimit -n {len(self.paths) + 2 * RESERVE_FDS} keeps all open",
                      file=sys.stderr, flush=True)
        return self.max_open

    def _fd(self, k: int) -> int:
        """The descriptor of shard k (BadImage with a one-line message when it cannot be opened)."""
        f = self._files.get(k)
        if f is not None:
            if self.max_open < len(self.paths):  # recency counts only where shards are closed for others
                self._files.move_to_end(k)
            return f.fileno()
        while True:
            while len(self._files) >= self._room():
                self._files.popitem(last=False)[1].close()
            try:  # an unbuffered file object only to hold the descriptor: closed by close() or when collected
                self._files[k] = open(self.paths[k], "rb", buffering=0)  # noqa: SIM115
                self.opens += 1
                return self._files[k].fileno()
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE):
                    raise BadImage(f"cannot open {self.paths[k]} ({e.strerror}); {self.hint}") from None
                if not self._files:
                    raise BadImage(too_many_files(self.paths[k])) from None
                # the rest of the process took more descriptors than RESERVE_FDS: keep fewer shards open
                self.max_open = max(1, len(self._files) // 2)

    def open_all(self) -> None:
        """Open every shard now, or as many as may stay open (DataError naming one that cannot be opened)."""
        try:
            for k in range(min(len(self.paths), self._room())):
                self._fd(k)
        except BadImage as e:
            raise DataError(str(e)) from None

    def pread(self, k: int, size: int, offset: int) -> bytes:
        """`size` bytes of shard k from `offset` (fewer where the shard ends sooner)."""
        return os.pread(self._fd(k), size, offset)

    def drop_page_cache(self) -> None:
        """Ask the kernel to forget the shards' cached pages, so the next reads come from storage."""
        if hasattr(os, "posix_fadvise"):
            for k in range(len(self.paths)):
                os.posix_fadvise(self._fd(k), 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        """Close the shard files (a later read opens them again)."""
        for f in self._files.values():
            f.close()
        self._files = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_files", "max_open", "opens")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _files=OrderedDict(), max_open=0, opens=0)


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
