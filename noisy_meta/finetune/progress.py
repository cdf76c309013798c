"""Progress display and summary tables (rich), on the main process only."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


class EpochProgress:
    """Progress of an epoch: loss, CE, meta loss, meta weight, throughput; silent if not ``enabled``.

    On a terminal, a live bar. Otherwise (a job scheduler's log file, a pipe) a live bar shows
    nothing until the epoch ends, so a plain line is printed every ``log_interval`` batches
    and after the last: batches done, loss, meta weight, img/s, elapsed time and ETA.
    """

    def __init__(self, console: Console, enabled: bool, log_interval: int = 50) -> None:
        self.console = console
        self.enabled = enabled
        self.log_interval = log_interval
        self._progress: Progress | None = None
        self._task = None
        self._started = 0.0
        self._images = 0
        self._plain: dict[str, int] | None = None

    def start(self, epoch: int, num_epochs: int, total_batches: int, done: int = 0) -> None:
        """A new epoch's display; ``done`` batches of it ran before a resume."""
        self._started, self._images = time.perf_counter(), 0
        if not self.enabled:
            return
        if not self.console.is_terminal:
            self._plain = dict(epoch=epoch + 1, epochs=num_epochs, total=total_batches, first=done, done=done)
            return
        self._progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{num_epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total_batches, completed=done, stats="")

    def update(self, stats: dict[str, float], batch_images: int) -> None:
        self._images += batch_images
        if self._plain is not None:
            self._plain["done"] += 1
            done, total = self._plain["done"], self._plain["total"]
            if done % self.log_interval == 0 or done == total:
                self.console.print(self._plain_line(self._stats_text(stats)), highlight=False, soft_wrap=True)
        if self._progress is not None:
            self._progress.update(self._task, advance=1, stats=self._stats_text(stats))

    def _stats_text(self, stats: dict[str, float]) -> str:
        return (
            f"loss {stats['loss']:.3f} ce {stats['ce_loss']:.3f} meta {stats['meta_loss']:.4f} "
            f"w {stats['meta_weight']:.2f} {self.throughput:.0f} img/s"
        )

    def _plain_line(self, stats: str) -> str:
        plain = self._plain
        elapsed = time.perf_counter() - self._started
        remaining = elapsed / (plain["done"] - plain["first"]) * (plain["total"] - plain["done"])
        return (
            f"epoch {plain['epoch']}/{plain['epochs']} batch {plain['done']}/{plain['total']} {stats} "
            f"elapsed {_clock(elapsed)} eta {_clock(remaining)}"
        )

    @property
    def throughput(self) -> float:
        return self._images / max(time.perf_counter() - self._started, 1e-9)

    def stop(self) -> None:
        self._plain = None
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def summary_table(records: Sequence[dict[str, Any]], best_epoch: int) -> Table:
    """Per-epoch accuracy of student and mentor; the best epoch is marked."""
    has_test = any("test_student" in r for r in records)
    table = Table(title="clean-test accuracy (%)" if has_test else "validation accuracy (%)")
    for header in ("epoch", "train loss", "val student", "val mentor"):
        table.add_column(header, justify="right")
    if has_test:
        table.add_column("test student", justify="right")
        table.add_column("test mentor", justify="right")
    table.add_column("skipped", justify="right")
    for record in records:
        row = [
            str(record["epoch"]) + (" *" if record["epoch"] == best_epoch else ""),
            f"{record['train_loss']:.3f}",
            f"{100 * record['val_student']:.2f}",
            f"{100 * record['val_mentor']:.2f}",
        ]
        if has_test:
            row += [f"{100 * record['test_student']:.2f}", f"{100 * record['test_mentor']:.2f}"]
        row.append(str(int(record["num_skipped"])))
        table.add_row(*row)
    table.caption = "* best epoch (validation), saved in best/"
    return table


def iterations_table(rows: Sequence[dict[str, Any]]) -> Table:
    """One line per iteration of iterative training: its data, its cleaning and its accuracy."""
    last = rows[-1]["record"]
    split = "test" if "test_student" in last else "val"
    table = Table(title=f"iterative training ({split} accuracy %, last epoch)")
    for header in ("iteration", "train samples", "flagged", "precision", "recall", "F1", "student", "mentor"):
        table.add_column(header, justify="right")
    for row in rows:
        report, record = row["report"], row["record"]
        detection = report.detection if report is not None else None
        table.add_row(
            str(row["iteration"]),
            str(row["train_size"]),
            "-" if detection is None else str(detection.num_flagged),
            _percent(detection.precision if detection else None),
            _percent(detection.recall if detection else None),
            _percent(detection.f1 if detection else None),
            _percent(record.get(f"{split}_student")),
            _percent(record.get(f"{split}_mentor")),
        )
    table.caption = "flagged / precision / recall: the cleaning that made that iteration's training set"
    return table


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"
