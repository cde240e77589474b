"""The preemption flag: SIGUSR1/SIGTERM recorded by a handler, acted on by the loop at a step boundary."""
from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import torch


class StopFlag:
    """Set by SIGUSR1/SIGTERM; handlers only record the request, the loop acts at a step boundary.

    The request reaches the other ranks inside the non-finite guard's per-step packet (tensor()), so all
    ranks learn it from the same all-reduce and save at the same step.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._pinned: torch.Tensor | None = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: saving from inside a signal handler would race the step in progress.
        self.requested = True
        self.signum = signum

    def install(self) -> StopFlag:
        """Route the stop signals to this flag (main thread only, as Python requires)."""
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def tensor(self, device: torch.device) -> torch.Tensor:
        """The request as a 0/1 float64 scalar on `device`, queued without waiting for the device."""
        if device.type != "cuda":
            return torch.tensor(float(self.requested), dtype=torch.float64)
        if self._pinned is None:
            self._pinned = torch.zeros((), dtype=torch.float64, pin_memory=True)
        # A copy from pageable memory would wait for the GPU; from this pinned buffer it is queued. Writing
        # while an earlier copy is in flight can only show a request one step early: the flag never clears.
        self._pinned.fill_(float(self.requested))
        return self._pinned.to(device, non_blocking=True)
