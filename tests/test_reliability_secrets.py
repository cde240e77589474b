"""Secret redaction: environment secrets, secret-named keys, override strings, token shapes, log records."""
from __future__ import annotations

import logging
import sys

import torch

from gcvit.engine.secrets import (
    REDACTED,
    install_log_redaction,
    redact,
    redact_text,
    redacted_argv,
    secret_values,
)

WANDB_KEY = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"


def test_environment_secrets_are_found_but_ordinary_values_are_not(monkeypatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    monkeypatch.setenv("HF_TOKEN", "hf_fakefakefakefakefakefakefakefake12")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # secret-looking name, harmless short value
    monkeypatch.setenv("SLURM_JOB_ID", "123456789")  # not secret-looking
    values = secret_values()
    assert WANDB_KEY in values and "hf_fakefakefakefakefakefakefakefake12" in values
    assert "false" not in values and "123456789" not in values


def test_redact_nested_config_and_overrides(monkeypatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    commit = "0123456789abcdef0123456789abcdef01234567"  # a git commit looks like a key but is not secret
    cfg = {
        "logger": {"wandb": {"mode": "online", "api_key": "typed-in-the-config", "entity": None}},
        "overrides": ["trainer.seed=3", "+logger.wandb.api_key=on-the-command-line", f"x={WANDB_KEY}"],
        "note": f"login with {WANDB_KEY} then run", "git": {"commit": commit},
        "tuple": ("ghp_" + "A" * 36, 3), "weights": torch.ones(2),
    }
    out = redact(cfg)
    assert out["logger"]["wandb"] == {"mode": "online", "api_key": REDACTED, "entity": None}
    assert out["overrides"] == ["trainer.seed=3", f"+logger.wandb.api_key={REDACTED}", f"x={REDACTED}"]
    assert out["note"] == f"login with {REDACTED} then run"
    assert out["git"]["commit"] == commit
    assert out["tuple"] == (REDACTED, 3)
    assert out["weights"] is cfg["weights"]
    assert cfg["logger"]["wandb"]["api_key"] == "typed-in-the-config"  # the input is not modified


def test_redact_text_pairs_and_token_shapes() -> None:
    line = "connect token=abc123def password: hunter2hunter2 AKIAABCDEFGHIJKLMNOP sk-" + "x" * 24
    assert redact_text(line, values=[]) == (f"connect token={REDACTED} password: {REDACTED} {REDACTED} "
                                            f"{REDACTED}")
    assert redact_text("step 10 loss 2.3 lr 0.001", values=[]) == "step 10 loss 2.3 lr 0.001"


def test_log_records_are_redacted(monkeypatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    logger = logging.getLogger("test_reliability_secrets")
    logger.propagate = False
    handler = Collect()
    logger.addHandler(handler)
    try:
        install_log_redaction(logger)
        install_log_redaction(logger)  # idempotent: one filter per handler
        assert len(handler.filters) == 1
        logger.warning("wandb key %s in use", WANDB_KEY)
    finally:
        logger.removeHandler(handler)
    assert records == [f"wandb key {REDACTED} in use"]


def test_redacted_argv_is_restored(monkeypatch) -> None:
    argv = ["train.py", "name=x", "+logger.wandb.api_key=abcdefgh123"]
    monkeypatch.setattr(sys, "argv", argv)
    with redacted_argv():
        assert sys.argv == ["train.py", "name=x", f"+logger.wandb.api_key={REDACTED}"]
    assert sys.argv is argv


def test_structures_without_secrets_come_back_unchanged(monkeypatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    sd = torch.nn.Linear(2, 2).state_dict()
    state = {"model": sd, "rng": [(3, (1, 2), None)], "note": "fine"}
    out = redact(state)
    assert out is state and out["model"]._metadata is sd._metadata  # module versions survive a save
