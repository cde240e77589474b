"""Crash-safe checkpoint files: atomic writes, keep-N, the newest loadable one, and safe loading.

A checkpoint is written to a temporary file in the same directory, fsync'ed, renamed over its name with
os.replace and the directory fsync'ed: a crash or a full disk leaves either the old or the new file, never a
half-written one. torch.load does not check the archive's CRC32s (a flipped bit loads silently), so every
file is verified with zipfile before it is trusted, then unpickled with weights_only=True.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from gcvit.engine.secrets import redact
from gcvit.models.checkpoint import CheckpointError, load_error, safe_load

SUFFIX = ".pt"
_STEP_TAG = re.compile(r"step(\d+)")
_TAG = re.compile(r"[A-Za-z0-9_.-]+")

if TYPE_CHECKING:
    from gcvit.engine.faults import SaveFaults


class CheckpointManager:
    """Checkpoint files `<tag>.pt` in one directory: step-tagged ones (keep-N), `last` and `best`."""

    def __init__(self, run_dir: Path | str, keep: int = 3, injected: SaveFaults | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.keep = keep
        self._saves = 0
        self._verified: dict[Path, tuple[int, int, int]] = {}  # path -> (inode, size, mtime) once checked
        self._faults = injected  # a test's pause inside a write (gcvit.engine.faults); None in real runs

    def path(self, tag: str) -> Path:
        """The file of `tag`."""
        return self.run_dir / f"{tag}{SUFFIX}"

    # ------------------------------------------------------------------------------------------- writing
    def save(self, state: dict[str, Any], *, tag: str | Sequence[str]) -> Path:
        """Write `state` atomically under `tag` (several tags: serialised once, hard-linked to the rest)."""
        tags = [tag] if isinstance(tag, str) else list(tag)
        for t in tags:
            if not _TAG.fullmatch(t):
                raise ValueError(f"checkpoint tag {t!r} is invalid; use letters, digits, '_', '-', '.'")
        _check_finite(state)
        state = redact(state)
        self._saves += 1
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self._saves == 1:
            self._remove_stale_tmp()
        first = self.path(tags[0])
        self._atomic(first, lambda f: torch.save(state, self._writer(f, first)))
        for t in tags[1:]:
            self._atomic(self.path(t), lambda f: _copy_into(first, f), link_from=first)
        self._prune()
        return first

    def _writer(self, f: IO[bytes], path: Path) -> Any:
        """`f`, or under a test's fault injection a writer that pauses inside this save."""
        return f if self._faults is None else self._faults.writer(f, self._saves, path)

    def _atomic(self, path: Path, write: Callable[[IO[bytes]], None], link_from: Path | None = None) -> None:
        """tmp file in the same dir -> fsync -> os.replace -> fsync dir; on any failure the old file stays."""
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            linked = False
            if link_from is not None:
                with contextlib.suppress(OSError):  # filesystems without hard links get a copy instead
                    os.link(link_from, tmp)
                    linked = True
            if not linked:
                with open(tmp, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            os_error = _os_error_in(e)
            if os_error is not None:
                reason = os_error.strerror or os_error
                raise CheckpointError(f"could not write checkpoint {path}: {reason}; the "
                                      f"previous {path.name} (if any) is untouched; free space or fix the "
                                      "directory and resume") from e
            raise
        self._verified.pop(path, None)
        _fsync_dir(self.run_dir)

    def _step_files(self) -> list[tuple[int, Path]]:
        """Step-tagged checkpoint files, newest step first."""
        out = []
        for p in self.run_dir.glob(f"step*{SUFFIX}"):
            m = _STEP_TAG.fullmatch(p.name[: -len(SUFFIX)])
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out, reverse=True)

    def _prune(self) -> None:
        """Keep the newest `keep` step-tagged files; `last` and `best` are separate names and always stay."""
        for _, p in self._step_files()[max(self.keep, 0):]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            self._verified.pop(p, None)

    def _remove_stale_tmp(self) -> None:
        """Temporary files of processes that were killed mid-write (a checkpoint's size each)."""
        for p in self.run_dir.glob(f".*{SUFFIX}.tmp*"):
            if not p.name.endswith(f".tmp{os.getpid()}"):
                with contextlib.suppress(OSError):
                    p.unlink()

    # ------------------------------------------------------------------------------------------- reading
    def candidates(self) -> list[Path]:
        """Existing checkpoint files, newest first: `last`, step-tagged by step, then `best`."""
        paths = [self.path("last")] + [p for _, p in self._step_files()] + [self.path("best")]
        return [p for p in paths if p.is_file()]

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies, warning in one line about each unusable one it skips."""
        for p in self.candidates():
            problem = self.problem(p)
            if problem is None:
                return p
            print(f"warning: skipping checkpoint {p}: {problem}; falling back to the previous one",
                  file=sys.stderr, flush=True)
        return None

    def problem(self, path: Path) -> str | None:
        """Why `path` cannot be loaded (truncated, corrupt, unsafe), or None when it is good."""
        path = Path(path)
        try:
            st = path.stat()
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            if self._verified.get(path) == key:
                return None
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()  # reads every record and checks its CRC32
            if bad is not None:
                return f"record {bad} fails its CRC32 check (the file is corrupt)"
            # mmap: unpickles the structure (allow-list included) without reading the tensor data again.
            safe_load(path, mmap=True)
        except zipfile.BadZipFile as e:
            return f"not a complete checkpoint archive ({e}); probably truncated by a crash or a full disk"
        except CheckpointError as e:  # refused to unpickle: the cause names the object
            return load_error(e.__cause__ or e)
        except Exception as e:  # torch.load's RuntimeError: the message is the diagnosis
            return load_error(e)
        self._verified[path] = key
        return None

    def load(self, path: Path | str) -> dict[str, Any]:
        """The state in `path`, verified first and unpickled safely (weights_only=True, on CPU)."""
        path = Path(path)
        problem = self.problem(path)
        if problem is not None:
            raise CheckpointError(f"cannot load checkpoint {path}: {problem}; delete or move it to resume "
                                  "from the previous checkpoint")
        return safe_load(path)


def _check_finite(state: Any) -> None:
    """Refuse to write NaN/Inf floating tensors: a checkpoint must hold a state training can resume from."""
    named: list[tuple[str, torch.Tensor]] = []

    def walk(obj: Any, prefix: str) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() or obj.is_complex():
                named.append((prefix, obj))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(obj, list | tuple):
            for i, v in enumerate(obj):
                walk(v, f"{prefix}.{i}")

    walk(state, "")
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        # One device sync per device, not one per tensor.
        ok = torch.stack([torch.isfinite(named[i][1]).all() for i in idx]).cpu()
        if not bool(ok.all()):
            name = named[idx[int((~ok).nonzero()[0])]][0]
            raise CheckpointError(f"refusing to write a checkpoint: {name} holds NaN/Inf values; the "
                                  "previous checkpoint is kept (the non-finite guard should prevent this)")


def _os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind `e`: torch.save re-raises a failed write as RuntimeError on closing the archive."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _copy_into(src: Path, f: IO[bytes]) -> None:
    with open(src, "rb") as s:
        shutil.copyfileobj(s, f, length=16 << 20)


def _fsync_dir(d: Path) -> None:
    """Make the rename itself durable (POSIX: the directory entry lives in the directory's data)."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
