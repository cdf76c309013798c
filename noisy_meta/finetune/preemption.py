"""Stopping a run cleanly when it is told to: SIGTERM (schedulers, spot machines) and SIGINT (Ctrl-C).

The first signal only sets a flag. The training loop reads it after each update (all ranks
agree on it in one small all-reduce, so they stop at the same update), writes ``last/`` and
raises `RunStopped`; the command line prints how to resume and exits with `EXIT_STOPPED`.
A second signal ends the process at once, as if no handler were installed.

``accelerate launch`` (torchrun) forwards the signal it receives to every rank, and a
terminal's Ctrl-C reaches launcher and ranks alike, so a rank often gets the same request
twice within a moment: a repeat within `REPEAT_WINDOW_S` counts as the same request. The
launcher kills ranks that have not exited 30 s after forwarding the signal, so an update plus
a checkpoint must fit in that time (torchrun's default).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import torch

#: The exit status of a run stopped by a signal after writing its checkpoint: sysexits'
#: EX_TEMPFAIL ("try again later"), distinct from success (0), errors (1, 2) and a kill (>128).
EXIT_STOPPED = 75

#: A second signal this soon after the first is the same request delivered twice (launcher and
#: terminal or scheduler), not a person asking to stop at once.
REPEAT_WINDOW_S = 2.0

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(Exception):
    """The run stopped on a signal after writing ``checkpoint``; ``--resume`` continues it."""

    def __init__(self, signal_name: str, checkpoint: Path, updates: int) -> None:
        super().__init__(
            f"stopped by {signal_name} after update {updates}; the checkpoint is {checkpoint}/, "
            "run the same command with --resume to continue from it"
        )
        self.signal_name, self.checkpoint, self.updates = signal_name, checkpoint, updates


class StopSignals:
    """A context that turns SIGTERM / SIGINT into a request the training loop honours between updates.

    Outside the main thread (where Python cannot install handlers) it does nothing and signals
    keep their usual effect.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received, self._received_at = number, time.monotonic()
            return
        if time.monotonic() - self._received_at < REPEAT_WINDOW_S:
            return
        signal.signal(number, signal.SIG_DFL)  # a second request: stop now, as with no handler
        os.kill(os.getpid(), number)

    def agreed(self, accelerator: Any) -> str | None:
        """The name of the signal any rank received (the same answer on every rank), or None."""
        received = self.received or 0
        if accelerator.num_processes > 1:
            flag = torch.tensor([received], dtype=torch.int64, device=accelerator.device)
            received = int(accelerator.reduce(flag, reduction="max").item())
        return signal.Signals(received).name if received else None
