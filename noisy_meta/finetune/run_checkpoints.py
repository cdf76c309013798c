"""When a fine-tuning run writes its checkpoints: epoch ends, every N updates, and on a stop signal.

``last/`` always holds the newest state. It is written after every epoch (with ``best/``
when validation improved), every ``--checkpoint-every`` updates in mid-epoch, and when
SIGTERM / SIGINT asks the run to stop (`noisy_meta.finetune.preemption`); ``--resume``
continues from it at the next batch. ``--keep-checkpoints K`` keeps the K - 1 states it
replaced in ``checkpoints/update_<n>/`` (each one a full checkpoint ``--resume DIR`` takes).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ..wrapper import MetaNoiseWrapper
from .checkpoint import save_checkpoint
from .preemption import RunStopped, StopSignals
from .run_state import RunState, validation_score


class RunCheckpoints:
    """The checkpoints of one run into ``output_dir``.

    Args:
        accelerator: the run's accelerator (its state, RNGs and registered objects are saved).
        wrapper: the MLNT wrapper (student, mentor, counters).
        state: the run's position and best score, registered for checkpointing.
        output_dir: where ``last/``, ``best/`` and ``checkpoints/`` go.
        every: write ``last/`` every this many updates as well; 0: at epoch ends only.
        keep: how many of the newest ``last/`` states to keep (``last/`` itself included).
        signals: the stop requests the run honours after each update and each epoch.
        flags: the run's flags as ``args.yaml`` records them (`noisy_meta.finetune.args_file`), kept in
            each checkpoint's ``position.json`` so that ``--resume`` can say what changed.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        wrapper: MetaNoiseWrapper,
        state: RunState,
        output_dir: Path,
        every: int = 0,
        keep: int = 1,
        signals: StopSignals | None = None,
        flags: dict[str, Any] | None = None,
    ) -> None:
        self.accelerator, self.wrapper, self.state = accelerator, wrapper, state
        self.output_dir, self.every, self.keep = output_dir, every, keep
        self.signals = signals if signals is not None else StopSignals()
        self.flags = flags
        self._saved_at = wrapper.num_updates  # a resumed run does not rewrite the state it started from

    def after_update(self, last_batch: bool) -> None:
        """Called on every rank after each optimizer update (``state`` already at this batch).

        Writes ``last/`` when ``--checkpoint-every`` is due and stops the run when a signal
        asked for it; on the epoch's last batch both are left to `after_epoch` (it validates,
        then writes ``last/``).
        """
        updates = self.wrapper.num_updates
        stop = self.signals.agreed(self.accelerator)
        if last_batch:  # a stop waits for the epoch's end, a moment away
            return
        if stop is not None:
            raise RunStopped(stop, self._save_last(f"stopped by {stop}"), updates)
        if self.every > 0 and updates % self.every == 0 and updates != self._saved_at:
            self._save_last(f"every {self.every} updates")

    def after_epoch(self, record: dict[str, Any], final: bool = False) -> None:
        """``last/`` after every epoch, ``best/`` when the validation score (student or mentor) improved.

        A stop requested during the epoch ends the run here, unless it was the ``final`` one.
        """
        epoch = record["epoch"]  # 1-based: the number of epochs done
        score = validation_score(record)
        state = self.state
        state.epoch, state.batch, state.totals = epoch, 0, {}
        if score > state.best_score:
            state.best_score, state.best_epoch = score, epoch
            self._save("best", "best epoch")
        self._save_last("epoch end")
        stop = self.signals.agreed(self.accelerator)
        if stop is not None and not final:
            raise RunStopped(stop, self.output_dir / "last", self.wrapper.num_updates)

    def _save_last(self, reason: str) -> Path:
        self._saved_at = self.wrapper.num_updates
        return self._save("last", reason, self.keep)

    def _save(self, name: str, reason: str, keep: int = 1) -> Path:
        directory = self.output_dir / name
        position = {
            "epoch": self.state.epoch,
            "batch": self.state.batch,
            "updates": self.wrapper.num_updates,
            "reason": reason,
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if self.flags is not None:
            position["flags"] = self.flags
        save_checkpoint(self.accelerator, directory, self.wrapper.module, self.wrapper.mentor, position, keep)
        return directory
