"""CheckpointManager: atomic writes under SIGKILL and full disks, corruption detection, unsafe pickles."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from gcvit.engine.checkpoint import CheckpointError, CheckpointManager
from gcvit.engine.faults import SAVE_PAUSE_ENV as PAUSE_ENV
from gcvit.engine.faults import SAVE_PAUSE_MARKER as PAUSE_MARKER

REPO = Path(__file__).resolve().parents[1]


def _state(step: int, size: int = 1000) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(size, generator=g)}, "progress": {"step": step},
            "rng": [torch.get_rng_state()], "config": {"name": "t"}}


def _assert_state(loaded: dict, step: int) -> None:
    assert loaded["progress"]["step"] == step
    w = loaded["model"]["w"]
    assert torch.equal(w, _state(step, size=w.numel())["model"]["w"])


def test_save_load_roundtrip_keep_n_and_tags(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path / "ck", keep=2)
    for s in range(1, 6):
        m.save(_state(s), tag=("last", f"step{s:09d}"))
    m.save(_state(3), tag="best")
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["best.pt", "last.pt", "step000000004.pt", "step000000005.pt"]  # keep-N, no tmp left
    assert m.latest() == m.path("last")
    _assert_state(m.load(m.latest()), 5)
    _assert_state(m.load(m.path("best")), 3)
    # Extra tags are hard links of the one serialisation; replacing `last` later leaves them intact.
    assert os.stat(m.path("last")).st_ino == os.stat(m.path("step000000005")).st_ino
    m.save(_state(6), tag="last")
    _assert_state(m.load(m.path("step000000005")), 5)
    with pytest.raises(ValueError, match="tag"):
        m.save(_state(1), tag="../escape")


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.unlink()  # a new inode: hard-linked siblings keep their content
    p.write_bytes(data[: len(data) // 2])


def _flip_byte_in_tensor_data(p: Path) -> None:
    data = bytearray(p.read_bytes())
    with zipfile.ZipFile(p) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 1000)
    # Local header is 30 bytes + name + extra; flip a byte well inside the record's payload.
    data[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF
    p.unlink()
    p.write_bytes(bytes(data))


def test_latest_skips_truncated_and_bitflipped_files_with_one_line_warnings(tmp_path: Path, capfd) -> None:
    m = CheckpointManager(tmp_path, keep=5)
    for s in (1, 2, 3):
        m.save(_state(s), tag=("last", f"step{s:09d}"))
    _truncate(m.path("last"))
    _flip_byte_in_tensor_data(m.path("step000000003"))
    # torch.load alone would happily return the flipped tensor; the CRC check must catch it.
    assert not torch.equal(torch.load(m.path("step000000003"), weights_only=True)["model"]["w"],
                           _state(3)["model"]["w"])
    assert m.latest() == m.path("step000000002")
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert "last.pt" in err[0] and "truncated" in err[0]
    assert "step000000003.pt" in err[1] and "CRC32" in err[1]
    _assert_state(m.load(m.latest()), 2)
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint .*last\.pt.*truncated.*previous"):
        m.load(m.path("last"))


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint off the internet would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_with_a_clear_message(tmp_path: Path, capfd) -> None:
    m = CheckpointManager(tmp_path)
    m.save(_state(1), tag="step000000001")
    marker = tmp_path / "pwned"
    evil = m.path("last")
    torch.save({"model": {"w": torch.zeros(3)}, "x": _RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError) as info:
        m.load(evil)
    msg = str(info.value)
    assert "\n" not in msg and "last.pt" in msg and "system" in msg and "arbitrary code" in msg
    assert m.latest() == m.path("step000000001")  # skipped, with a warning naming it
    assert "last.pt" in capfd.readouterr().err
    assert not marker.exists()


def test_refuses_to_write_non_finite_tensors(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path)
    m.save(_state(1), tag="last")
    bad = _state(2)
    bad["optimizer"] = {"state": {0: {"exp_avg": torch.tensor([1.0, float("nan")])}}}
    with pytest.raises(CheckpointError, match=r"optimizer\.state\.0\.exp_avg holds NaN/Inf"):
        m.save(bad, tag="last")
    _assert_state(m.load(m.path("last")), 1)


def test_secrets_never_reach_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    key = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", key)
    m = CheckpointManager(tmp_path)
    st = _state(1)
    st["config"] = {"logger": {"wandb": {"api_key": "literal-secret-value"}}, "note": f"key is {key}"}
    m.save(st, tag="last")
    raw = m.path("last").read_bytes()
    assert key.encode() not in raw and b"literal-secret-value" not in raw
    assert m.load(m.path("last"))["config"]["note"] == "key is <redacted>"


_CHILD = textwrap.dedent("""
    import sys, torch
    from gcvit.engine.checkpoint import CheckpointManager
    from gcvit.engine.faults import save_faults
    m = CheckpointManager(sys.argv[1], injected=save_faults())
    for s in (1, 2):
        m.save({"w": torch.full((200_000,), float(s)), "step": s}, tag="last")
    print("finished", flush=True)
""")


def test_sigkill_inside_save_keeps_previous_last(tmp_path: Path) -> None:
    """A real SIGKILL while the second `last` is half-written: the first stays and is what latest() gives."""
    env = {**os.environ, PAUSE_ENV: "60@2", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while PAUSE_MARKER not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, f"child exited early: {proc.stderr.read()}"
            assert time.monotonic() < deadline
        tmp = [p for p in tmp_path.iterdir() if p.name.startswith(".last.pt.tmp")]
        assert len(tmp) == 1 and tmp[0].stat().st_size > 0  # the kill lands inside a real write
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    m = CheckpointManager(tmp_path)
    assert m.latest() == m.path("last")
    assert m.load(m.latest())["step"] == 1
    m.save({"step": 3}, tag="last")  # the next run's first save sweeps the dead process's temporary file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def _fill_then_save(ck_dir: Path) -> str:
    m = CheckpointManager(ck_dir)
    m.save(_state(1, size=20_000), tag="last")
    with pytest.raises(CheckpointError) as info:
        m.save(_state(2, size=200_000), tag="last")
    msg = str(info.value)
    _assert_state(m.load(m.path("last")), 1)
    assert m.latest() == m.path("last")
    assert [p.name for p in ck_dir.iterdir()] == ["last.pt"]  # the failed temporary file is gone
    return msg


def test_full_disk_tmpfs_keeps_previous_checkpoint(tmp_path: Path) -> None:
    """A real filesystem that runs out of space (a 512 KiB tmpfs; needs root)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root; test_full_disk_failing_writer covers the same path")
    try:
        msg = _fill_then_save(mnt)
        assert "No space left on device" in msg and "previous last.pt" in msg
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_failing_writer_keeps_previous_checkpoint(tmp_path: Path) -> None:
    """The kernel refuses writes past RLIMIT_FSIZE (EFBIG) exactly where a full disk would (ENOSPC)."""
    ck = tmp_path / "ck"
    code = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the EFBIG error instead of being killed
        from test_reliability_checkpoint import _fill_then_save
        from pathlib import Path
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, {resource.RLIM_INFINITY}))
        print(_fill_then_save(Path({str(ck)!r})))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "could not write checkpoint" in out.stdout and "File too large" in out.stdout
