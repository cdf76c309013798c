"""Where a fine-tuning run is (`RunState`, checkpointed with the run) and what it has logged (`MetricsLog`).

Beside `noisy_meta.finetune.run_checkpoints`, which decides when the state is written;
`noisy_meta.finetune.checkpoint` holds the files themselves (safetensors weights, atomic
checkpoint directories, their checks).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class MetricsLog:
    """``metrics.jsonl``: one JSON object per epoch, appended as epochs finish."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, epochs: int) -> None:
        """Keep the records of the first ``epochs`` epochs (what a resumed run has done; epochs count from 1)."""
        records = [r for r in self.read() if r["epoch"] <= epochs]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in records))


def validation_score(record: dict[str, Any]) -> float:
    """An epoch's validation score, which ``best/`` keeps the maximum of: the better of student and mentor."""
    return max(record["val_student"], record["val_mentor"])


@dataclass
class SkipCounter:
    """Consecutive updates skipped for a non-finite loss or gradient; ``limit`` 0 never stops."""

    limit: int
    consecutive: int = 0


class RunState:
    """Where the run is, checkpointed with ``accelerator.register_for_checkpointing``.

    ``epoch`` counts the epochs done, ``batch`` the batches of the next epoch done (0 at an
    epoch's end), ``totals`` that epoch's running sums of the training statistics so far and
    ``skips`` the non-finite updates in a row: with them a checkpoint taken mid-epoch resumes
    at the next batch with the epoch's figures as if never interrupted.
    """

    def __init__(self, max_consecutive_skips: int = 0) -> None:
        self.epoch = 0
        self.batch = 0
        self.totals: dict[str, float] = {}
        self.skips = SkipCounter(max_consecutive_skips)
        self.best_score = float("-inf")
        self.best_epoch = -1

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "totals": dict(self.totals),
            "consecutive_skips": self.skips.consecutive,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batch = int(state.get("batch", 0))  # checkpoints of earlier versions: epoch ends only
        self.totals = {key: float(value) for key, value in state.get("totals", {}).items()}
        self.skips.consecutive = int(state.get("consecutive_skips", 0))
        self.best_score = float(state["best_score"])
        self.best_epoch = int(state["best_epoch"])
