"""Through the real train.py: NaN injection (skip / stop), secrets never written, bad inputs and a CUDA
out-of-memory error give one clear line, W&B without network never hangs, safetensors conversion. CPU,
DALI cpu on JPEGs this test writes, the tiny debug model; the independent launches share one fixture and
run a few at a time."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from reliability_harness import REPO, Run, child_env, make_dataset, run_all, state

import gcvit
from gcvit.engine.checkpoint import CheckpointManager
from gcvit.engine.faults import NAN_ENV as INJECT_ENV
from gcvit.engine.faults import OOM_ENV

pytestmark = pytest.mark.slow

WANDB_KEY = "feedfacecafebeef0123456789abcdef01234567"
HF_TOKEN = "hf_" + "Zq8" * 12
BASE = ("debug=tiny", "trainer.max_steps=4")
# A W&B server address nothing listens on: what `online` meets on a compute node without internet.
NO_NETWORK = {"WANDB_API_KEY": WANDB_KEY, "WANDB_BASE_URL": "http://127.0.0.1:9"}
# name -> the strings one line of stderr must contain
EXPECTED_LINES = {
    "unknown key": ("trainer.no_such_key",),
    "unknown value": ("trainer.precision", "fp8", "bf16"),
    "missing dataset": ("nowhere",),
    "empty dataset": ("empty",),
    "unwritable output": ("a-file", "trainer.output_dir"),
    "wrong variant": ("does not fit this model", "dim 16"),
    "nan stop": ("non-finite values at step 3", "loss=nan", "max_consecutive=2"),
    "cuda oom": ("CUDA out of memory in training step 2", "tried to allocate 2.00 GiB", "data.batch_size=8",
                 "lower data.batch_size (e.g. data.batch_size=4)", "trainer.global_batch_size=16",
                 "model.grad_checkpointing=true"),
}


def _bad_dataset(root: Path) -> Path:
    """A generated dataset plus a truncated JPEG and a text file named .JPEG."""
    make_dataset(root, classes=2, train_per_class=10, val_per_class=2)
    good = next((root / "train" / "n00000000").iterdir())
    (root / "train" / "n00000000" / "truncated.JPEG").write_bytes(good.read_bytes()[:300])
    (root / "train" / "n00000001" / "notes.JPEG").write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every launch of this module, finished."""
    tmp = tmp_path_factory.mktemp("inputs")
    data = f"data.root={make_dataset(tmp / 'data')}"
    (tmp / "empty" / "train").mkdir(parents=True)
    (tmp / "empty" / "val").mkdir()
    (tmp / "a-file").write_text("")
    torch.manual_seed(0)  # a checkpoint of another variant (gcvit_xxtiny, full width) for the tiny model
    torch.save(gcvit.create_model("gcvit_xxtiny", num_classes=4, img_size=32).state_dict(), tmp / "other.pth")
    launches: dict[str, tuple[Path, tuple[str, ...], dict[str, str]]] = {
        # NaN at step 2, policy skip; W&B `online` without network; secrets in the environment and on argv.
        "nan skip": (tmp / "skip", (*BASE, data, "trainer.nonfinite_policy=skip",
                                    "trainer.ckpt_every_steps=1", "trainer.keep_checkpoints=10",
                                    "logger.wandb.mode=online", f"name=leak-{HF_TOKEN}"),
                     {INJECT_ENV: "2", "HF_TOKEN": HF_TOKEN, **NO_NETWORK}),
        "nan stop": (tmp / "stop", (*BASE, data, "trainer.nonfinite_policy=stop",
                                    "trainer.nonfinite_max_consecutive=2", "trainer.ckpt_every_steps=1"),
                     {INJECT_ENV: "2,3"}),
        # torch.OutOfMemoryError raised in step 2's first micro-batch, as CUDA raises it
        "cuda oom": (tmp / "oom", (*BASE, data), {OOM_ENV: "2"}),
        "corrupt jpegs": (tmp / "corrupt", (*BASE, f"data.root={_bad_dataset(tmp / 'bad')}"), {}),
        "unknown key": (tmp / "key", (*BASE, data, "trainer.no_such_key=1"), {}),
        "unknown value": (tmp / "value", (*BASE, data, "trainer.precision=fp8"), {}),
        "missing dataset": (tmp / "missing", (*BASE, f"data.root={tmp / 'nowhere'}"), {}),
        "empty dataset": (tmp / "emptyrun", (*BASE, f"data.root={tmp / 'empty'}"), {}),
        "unwritable output": (tmp / "a-file" / "run", (*BASE, data), {}),
        "wrong variant": (tmp / "eval", (*BASE, data, "mode=eval", f"checkpoint={tmp / 'other.pth'}"), {}),
    }
    return {**run_all(launches, logs=tmp / "logs"), "bad root": tmp / "bad"}


def _finite(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return all(_finite(v) for v in obj)
    return True


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _one_line_problem(run: Run, *needles: str) -> str | None:
    """None when the run failed without a traceback and one line of stderr names everything in `needles`."""
    err = run.err()
    if run.procs[0].returncode == 0:
        return f"exited 0:\n{run.out()[-2000:]}"
    if "Traceback" in err + run.out():
        return f"traceback instead of one line:\n{err[-3000:]}"
    if not any(all(n in line for n in needles) for line in err.splitlines()):
        return f"no line of stderr names {needles}:\n{err[-3000:]}"
    return None


def test_nan_skip_policy_skips_the_step_and_keeps_weights_finite(runs: dict[str, Any]) -> None:
    run = runs["nan skip"].check()
    assert "skipped step 2: loss=nan" in run.err()
    s1, s2, s3 = (state(run.run_dir, f"step{i:09d}") for i in (1, 2, 3))
    assert _same(s1["model"], s2["model"]) and _same(s1["ema"], s2["ema"])  # EMA of unchanged weights
    assert not _same(s2["model"], s3["model"])
    assert s2["guard"]["skipped"] == 1
    mgr = CheckpointManager(run.run_dir / "checkpoints")
    for p in mgr.candidates():
        st = mgr.load(p)
        assert _finite(st["model"]) and _finite(st["ema"]) and _finite(st["optimizer"]), p


def test_nan_stop_policy_stops_with_one_line_naming_step_and_value(runs: dict[str, Any]) -> None:
    run = runs["nan stop"]
    assert _one_line_problem(run, *EXPECTED_LINES["nan stop"]) is None
    last = state(run.run_dir)
    assert last["progress"]["step"] == 2 and _finite(last["model"]) and _finite(last["optimizer"])


def test_wandb_online_without_network_falls_back_to_offline_and_never_hangs(runs: dict[str, Any]) -> None:
    run = runs["nan skip"].check()
    warning = [ln for ln in run.err().splitlines() if "logger.wandb.mode=online" in ln]
    assert len(warning) == 1 and "unreachable" in warning[0] and "offline" in warning[0]
    assert list((run.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_secrets_never_reach_logs_run_info_config_dump_wandb_or_checkpoints(runs: dict[str, Any]) -> None:
    run = runs["nan skip"].check()
    files = [p for p in run.run_dir.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"run_info.json", "config.yaml", "overrides.yaml", "last.pt", "metrics.jsonl"} <= names
    assert any(p.suffix == ".wandb" for p in files), "the W&B offline run is part of what is checked"
    for p in [*files, run.logs / "rank0.out", run.logs / "rank0.err"]:
        data = p.read_bytes()
        for secret in (WANDB_KEY, HF_TOKEN):
            assert secret.encode() not in data, f"{secret[:6]}... leaked into {p}"
    assert "leak-<redacted>" in (run.run_dir / ".hydra" / "config.yaml").read_text()


def test_bad_inputs_fail_fast_with_one_clear_line(runs: dict[str, Any]) -> None:
    """Unknown key/value, missing/empty dataset, unwritable output dir, checkpoint of another variant."""
    names = ("unknown key", "unknown value", "missing dataset", "empty dataset", "unwritable output",
             "wrong variant")
    problems = {n: _one_line_problem(runs[n], *EXPECTED_LINES[n]) for n in names}
    assert not any(problems.values()), "\n\n".join(f"{k}: {v}" for k, v in problems.items() if v)


def test_cuda_out_of_memory_is_one_line_naming_the_micro_batch_and_what_to_do(runs: dict[str, Any]) -> None:
    assert _one_line_problem(runs["cuda oom"], *EXPECTED_LINES["cuda oom"]) is None


def test_corrupt_jpegs_are_reported_by_data_verify_and_never_crash_training_opaquely(
        runs: dict[str, Any]) -> None:
    verify = subprocess.run([sys.executable, "-m", "gcvit_data.verify", str(runs["bad root"])], cwd=REPO,
                            capture_output=True, text=True, timeout=180, env=child_env())
    report = verify.stdout + verify.stderr
    assert verify.returncode != 0 and "truncated.JPEG" in report and "notes.JPEG" in report, report[-3000:]
    run = runs["corrupt jpegs"]
    if run.procs[0].returncode != 0:  # refusing is fine with a line naming a bad file and the tool
        assert _one_line_problem(run, "gcvit_data.verify") is None
        assert "truncated.JPEG" in run.err() or "notes.JPEG" in run.err()


def test_convert_writes_and_reads_safetensors(tmp_path: Path) -> None:
    """Native .pth -> .safetensors (the command line) -> .pth (its main()): every tensor unchanged."""
    from safetensors.torch import load_file

    from gcvit.convert import main as convert

    torch.manual_seed(0)
    weights = gcvit.create_model("gcvit_xxtiny", num_classes=10, img_size=64).state_dict()
    src, mid, back = tmp_path / "model.pth", tmp_path / "model.safetensors", tmp_path / "back.pth"
    torch.save(weights, src)
    res = subprocess.run([sys.executable, "-m", "gcvit.convert", str(src), str(mid), "--to", "native"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=child_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert convert([str(mid), str(back), "--to", "native"]) == 0
    for got in (load_file(mid), torch.load(back, weights_only=True)):
        got = got.get("state_dict", got)
        assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights)
