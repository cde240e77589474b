"""Redaction of secrets (W&B API key, tokens and passwords from the environment) before anything is written.

Everything a run writes (run_info.json, the .hydra config dump, checkpoints, logs) passes through
`redact`/`redact_text`: a value is hidden when its key looks secret (`api_key`, `token`, `password`, ...),
when it contains the value of a secret-looking environment variable, or when it has the shape of a
well-known token (GitHub, Hugging Face, OpenAI-style, AWS access key ids, Slack).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from typing import TypeVar

T = TypeVar("T")

REDACTED = "<redacted>"

# Names of keys and environment variables whose values are secrets. PASS alone would also catch
# GIT_ASKPASS (a program path); AUTH alone would catch SSH_AUTH_SOCK: both harmless, neither secret.
_SECRET_NAME = re.compile(r"(api[_-]?key|access[_-]?key|secret|token|password|passwd|credential"
                          r"|private[_-]?key|auth[_-]?key|bearer|session[_-]?key)", re.IGNORECASE)
# Environment values shorter than this are too likely to be ordinary words ("true", "false", "1").
_MIN_SECRET_LEN = 8
# `key=value` / `key: value` pairs inside free text (Hydra override strings, log lines, URLs' queries).
_PAIR = re.compile(r"(?P<k>[\w.+-]*(?:api[_-]?key|secret|token|password|passwd|credential)[\w.-]*)"
                   r"(?P<sep>\s*[=:]\s*)(?P<v>[^\s,;&'\"}]+)", re.IGNORECASE)
# Token shapes that are secret wherever they appear.
_TOKEN_SHAPES = re.compile(r"\b(ghp_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}|hf_[A-Za-z0-9]{30,}"
                           r"|sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9-]{10,})\b")


def is_secret_name(name: str) -> bool:
    """True for keys / environment variable names that hold secrets (WANDB_API_KEY, hf_token, ...)."""
    return bool(_SECRET_NAME.search(name))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables, longest first (so overlapping ones redact fully)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if is_secret_name(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, values: list[str] | None = None) -> str:
    """`text` with secret environment values, `secret=...` pairs and known token shapes replaced."""
    for v in secret_values() if values is None else values:
        if v in text:
            text = text.replace(v, REDACTED)
    text = _PAIR.sub(lambda m: m["k"] + m["sep"] + (m["v"] if m["v"] == REDACTED else REDACTED), text)
    return _TOKEN_SHAPES.sub(REDACTED, text)


def redact(obj: T, values: list[str] | None = None) -> T:
    """`obj` with secrets hidden in nested dicts/lists/tuples/strs; parts holding none come back as is."""
    values = secret_values() if values is None else values
    if isinstance(obj, str):
        return redact_text(obj, values)  # type: ignore[return-value]
    if isinstance(obj, Mapping):
        out = {k: REDACTED if isinstance(k, str) and is_secret_name(k) and isinstance(v, str) and v
               else redact(v, values) for k, v in obj.items()}
        if all(_same(out[k], v) for k, v in obj.items()):
            return obj  # keeps state dicts' identity and their _metadata (module versions)
        return type(obj)(out) if type(obj) is not dict and _rebuildable(obj) else out  # type: ignore[return-value]
    if isinstance(obj, list | tuple) and not hasattr(obj, "_fields"):
        seq = [redact(v, values) for v in obj]
        if all(_same(a, b) for a, b in zip(seq, obj)):
            return obj
        return tuple(seq) if isinstance(obj, tuple) else seq  # type: ignore[return-value]
    return obj


def _same(new: object, old: object) -> bool:
    return new is old or (type(new) is str and new == old)


def _rebuildable(obj: Mapping) -> bool:
    # OrderedDict (model state dicts) keeps its type; exotic mappings become plain dicts.
    try:
        type(obj)()
        return True
    except TypeError:
        return False


class RedactingFilter(logging.Filter):
    """Logging filter that rewrites each record's message with `redact_text`."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the formatted message in place; never drops a record."""
        msg = record.getMessage()
        clean = redact_text(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Attach a RedactingFilter to every handler of `logger` (root by default): covers propagated records."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


@contextlib.contextmanager
def redacted_argv() -> Iterator[None]:
    """sys.argv redacted for the duration (W&B records the command line in its run metadata)."""
    saved = sys.argv
    sys.argv = redact(list(saved))
    try:
        yield
    finally:
        sys.argv = saved
