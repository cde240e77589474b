"""Weights & Biases on rank 0: the run (online, offline or disabled) kept under one id, the server check."""
from __future__ import annotations

import os
import socket
import sys
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gcvit.engine.secrets import redact, redacted_argv


def wandb_unreachable(timeout: float = 5.0) -> str | None:
    """Why a TCP connection to the W&B server (or the HTTPS proxy in front of it) fails; None if it works."""
    url = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    proxy = urllib.request.getproxies().get(url.scheme)
    bypass = urllib.request.proxy_bypass(url.hostname or "")
    target = urllib.parse.urlparse(proxy) if proxy and not bypass else url
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"{url.geturl()} is unreachable ({e.strerror or e})"
    return None


class WandbLogger:
    """Weights & Biases on rank 0 in online|offline|disabled mode; the run id survives restarts."""

    def __init__(self, mode: str, project: str, entity: str | None, run_dir: Path, enabled: bool) -> None:
        self.mode, self.project, self.entity, self.run_dir = mode, project, entity, run_dir
        self.enabled = enabled and mode != "disabled"
        self.run_id: str = uuid.uuid4().hex[:12]
        self._run: Any = None

    def state_dict(self) -> dict[str, str]:
        """The run id, so a resumed job appends to the same W&B run."""
        return {"run_id": self.run_id}

    def load_state_dict(self, state: Mapping[str, str]) -> None:
        """Reuse the stored run id (call before start())."""
        self.run_id = state["run_id"]

    def start(self, name: str, config: Mapping[str, Any]) -> None:
        """Open (or reopen) the run with the resolved config; offline mode never touches the network."""
        if not self.enabled:
            return
        import wandb

        # W&B's client retries an unreachable server for 90 s per call; a run must not wait on it.
        problem = wandb_unreachable() if self.mode == "online" else None
        if problem is None:
            try:
                self._init(name, config, self.mode)
                return
            except wandb.errors.Error as e:  # no API key, a failing server: lose no metrics, go offline
                if self.mode != "online":
                    raise
                problem = str(e).strip().splitlines()[0]
        print(f"warning: logger.wandb.mode=online but {problem}; logging offline to {self.run_dir}/wandb "
              "instead (upload it later with `wandb sync`)", file=sys.stderr, flush=True)
        self._init(name, config, "offline")

    def _init(self, name: str, config: Mapping[str, Any], mode: str) -> None:
        import wandb

        settings = wandb.Settings(silent=True, console="off")
        with redacted_argv():  # W&B records the command line, which may carry a token
            self._run = wandb.init(project=self.project, entity=self.entity, name=name, id=self.run_id,
                                   resume="allow", mode=mode, dir=str(self.run_dir),
                                   config=redact(dict(config)), settings=settings)

    def log(self, record: Mapping[str, Any], step: int) -> None:
        """Forward one metrics record: numbers and names, nested records flattened (nodes/HOST/data)."""
        if self._run is not None:
            self._run.log(_flat(record), step=step)

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Log rows as one W&B table (the eval summary)."""
        if self._run is not None:
            import wandb

            self._run.log({key: wandb.Table(columns=columns, data=rows)})

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (a preempted run stays resumable)."""
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None


def _flat(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The record's numbers and strings (but its kind), nested mappings as PREFIX/KEY."""
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, str)) and k != "kind":
            out[prefix + k] = v
    return out
