"""``--log-with``: the run's figures in Accelerate's experiment trackers (TensorBoard, W&B, MLflow, Aim, ...).

Accelerate builds the trackers (``Accelerator(log_with=..., project_config=...)`` and
``init_trackers``); local ones write under ``<output-dir>/tracking/<experiment>/``. The
tracker run is named ``--experiment`` (timm's name; default: the output directory's name, so
a resumed run continues the same one) and gets the run's flags as its configuration. Logged,
on the main process only:

- every update: ``train/loss``, ``train/ce_loss``, ``train/meta_loss``, ``train/labels_changed``,
  ``train/meta_weight``, ``train/lr``, and on the updates that run the meta step what its fast
  step did: ``train/fast_divergence`` (``KL(student || fast student)``) and ``train/fast_step``
  (``||theta' - theta|| / ||theta||``);
- every epoch: ``val/student``, ``val/mentor``, ``test/student``, ``test/mentor``, the epoch's mean
  losses (``epoch/train_loss`` ...), ``epoch/images_per_second`` and ``epoch``.

Steps count updates from the start of the whole command, so ``--iterations K`` is one tracker
run whose step keeps rising across iterations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from accelerate import Accelerator

#: ``--log-with`` values: Accelerate's trackers (`accelerate.utils.LoggerType`), ``all`` those installed.
TRACKERS = ("all", "aim", "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab")


#: The package each tracker needs (to name it when it is missing).
_PACKAGES = {"comet_ml": "comet-ml"}
#: The per-update figures logged (keys of `MetaNoiseWrapper.step`'s result).
UPDATE_FIGURES = ("loss", "ce_loss", "meta_loss", "labels_changed", "meta_weight", "fast_divergence", "fast_step")


def check_trackers(log_with: tuple[str, ...]) -> None:
    """Refuse a ``--log-with`` tracker that is not installed (Accelerate would drop it silently)."""
    from accelerate.tracking import get_available_trackers

    available = {str(tracker) for tracker in get_available_trackers()}
    wanted = [name for name in log_with if name != "all"]
    missing = [name for name in wanted if name not in available]
    if missing:
        install = " ".join(_PACKAGES.get(name, name) for name in missing)
        raise ValueError(f"--log-with {' '.join(missing)}: not installed (pip install {install})")
    if "all" in log_with and not available:
        raise ValueError("--log-with all: no tracker is installed (pip install tensorboard, or wandb, mlflow, aim)")


def tracker_config(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The run's recorded flags (`noisy_meta.finetune.flags.recorded_flags`) as a tracker's configuration: numbers,
    strings and booleans only (TensorBoard's hparams)."""

    def plain(value: Any) -> Any:
        return value if isinstance(value, (bool, int, float, str)) else str(value)

    return {name: plain(value) for name, value in flags.items()}


class RunTracker:
    """The trackers of one command (every ``--iterations`` run logs to the same tracker run).

    Args:
        accelerator: the first run's accelerator, built with ``log_with`` (`make_accelerator`);
            the trackers it starts outlive the accelerators of later iterations.
        experiment: the tracker run's name (``--experiment``); ``None`` (no ``--log-with``), or
            no ``accelerator``: a tracker that logs nothing.
        flags: the run's recorded flags (`noisy_meta.finetune.flags.recorded_flags`), the tracker run's configuration.
    """

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        experiment: str | None = None,
        flags: Mapping[str, Any] | None = None,
    ) -> None:
        self.offset = 0  # updates of the runs before this one (iterations)
        self._trackers: list[Any] = []
        if experiment is not None and accelerator is not None:
            accelerator.init_trackers(experiment, config=tracker_config(flags or {}))
            self._trackers = list(accelerator.trackers) if accelerator.is_main_process else []

    def step(self, updates: int) -> int:
        """The tracker step of this run's ``updates``-th update."""
        return self.offset + updates

    def log_update(self, updates: int, stats: dict[str, float], lr: float) -> None:
        """One update's figures (``stats``: `MetaNoiseWrapper.step`'s result)."""
        if self._trackers:
            figures = {key: float(stats[key]) for key in UPDATE_FIGURES if key in stats}
            values = {f"train/{key}": value for key, value in figures.items() if math.isfinite(value)}
            self._log({**values, "train/lr": float(lr)}, self.step(updates))

    def log_epoch(self, record: dict[str, Any]) -> None:
        """An epoch's record (as ``metrics.jsonl`` holds it): accuracies, mean losses, speed."""
        if not self._trackers:
            return
        values: dict[str, float] = {"epoch": record["epoch"]}
        for split in ("val", "test"):
            for who in ("student", "mentor"):
                if f"{split}_{who}" in record:
                    values[f"{split}/{who}"] = record[f"{split}_{who}"]
        for key in ("train_loss", "train_ce_loss", "train_meta_loss", "fast_divergence", "fast_step"):
            if record.get(key) is not None:  # fast_*: None in an epoch without a meta step
                values[f"epoch/{key}"] = record[key]
        for key in ("images_per_second", "seconds"):
            if key in record:
                values[f"epoch/{key}"] = record[key]
        self._log(values, self.step(record["updates"]))

    def finished_run(self, updates: int) -> None:
        """A run (one iteration) ended after ``updates`` updates: the next one's steps follow on."""
        self.offset += updates

    def _log(self, values: dict[str, float], step: int) -> None:
        for tracker in self._trackers:
            tracker.log(values, step=step)


__all__ = ["TRACKERS", "RunTracker", "check_trackers", "tracker_config"]
