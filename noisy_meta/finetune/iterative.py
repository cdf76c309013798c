"""MLNT's iterative training on the command line: runs with data cleaning in between.

From the second run on, the previous run's best mentor judges the original training split,
the samples it flags are removed or relabelled (`noisy_meta.labels.cleaning`), and it mentors the
next run. Each run lives in ``<output-dir>/iteration_<k>/``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..labels.cleaning import CleaningReport, clean_dataset, save_cleanlab_inputs
from ..labels.noisy_datasets import INDEX, LABEL
from .checkpoint import MetricsLog, find_checkpoint
from .data import Splits
from .distributed import make_accelerator
from .models import load_mentor
from .names import CLEANING_FILE, MENTOR_FILE, METRICS_FILE, PRED_PROBS_FILE
from .progress import iterations_table
from .settings import RunContext
from .train_loop import predict_train_set


def train_iterations(
    context: RunContext, splits: Splits, output_dir: Path, train_run: Callable[..., dict[str, Any]]
) -> dict[str, Any]:
    """MLNT's iterative training: from the second run on, the previous best mentor cleans the data and mentors.

    Each iteration is a whole run in ``<output-dir>/iteration_<k>/``; the cleaning that made
    its training set is in ``cleaning.json`` and ``pred_probs.npz`` there. The mentor judges
    the *original* training split each time. With ``--resume``, finished iterations are kept
    and the first unfinished one continues from its last checkpoint.
    """
    settings, console = context.settings, context.console
    iterations, resuming = settings.iterative.iterations, settings.control.resume is not None
    rows: list[dict[str, Any]] = []
    record: dict[str, Any] = {}
    for iteration in range(1, iterations + 1):
        run_dir = output_dir / f"iteration_{iteration}"
        console.rule(f"iteration {iteration} of {iterations}")
        train_set, mentor, report = splits.train, None, None
        if iteration > 1:
            previous = find_checkpoint(output_dir / f"iteration_{iteration - 1}" / "best") / MENTOR_FILE
            mentor = load_mentor(settings.model, splits.num_classes, previous)
            probs = predict_train_set(context, mentor, splits.train)
            train_set, report = clean_dataset(splits.train, probs, settings.iterative.cleaning, splits.num_classes)
            if context.is_main_process:
                run_dir.mkdir(parents=True, exist_ok=True)
                report.save(run_dir / CLEANING_FILE)
                save_cleanlab_inputs(run_dir / PRED_PROBS_FILE, splits.train[LABEL], probs, splits.train[INDEX])
            console.print(_cleaning_line(report, len(splits.train)))
            if len(train_set) < settings.optim.batch_size * context.accelerator.num_processes:
                raise ValueError(
                    f"cleaning before iteration {iteration} left {len(train_set)} training samples, fewer than one "
                    "batch; loosen --clean-criterion / --clean-threshold"
                )
        done = _finished_records(run_dir, settings.optim.epochs) if resuming else None
        if done is not None:
            console.print(f"iteration {iteration} finished before: kept")
            record = done
            context.tracker.finished_run(done["updates"])
        else:
            resume = resuming and (run_dir / "last").exists()
            record = train_run(context, splits, train_set, run_dir, mentor, resume)
            # the next run prepares its own model and state
            context = dataclasses.replace(context, accelerator=make_accelerator(settings))
        rows.append({"iteration": iteration, "train_size": len(train_set), "report": report, "record": record})
    console.print(iterations_table(rows))
    return record


def _finished_records(run_dir: Path, epochs: int) -> dict[str, Any] | None:
    """The last record of an iteration whose metrics log is complete, else None."""
    log = run_dir / METRICS_FILE
    records = MetricsLog(log).read() if log.exists() else []
    return records[-1] if len(records) >= epochs and (run_dir / "best").exists() else None


def _cleaning_line(report: CleaningReport, total: int) -> str:
    detection = report.detection
    config = report.config
    line = f"cleaning ({config.criterion} {config.threshold}, {config.action}): "
    line += f"flagged {detection.num_flagged} of {total}"
    if detection.precision is not None or detection.recall is not None:
        line += (
            f"; against the clean labels precision {_percent(detection.precision)}, "
            f"recall {_percent(detection.recall)}, F1 {_percent(detection.f1)}"
        )
    return line + f"; per class after: {report.remaining_per_class}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
