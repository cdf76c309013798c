"""What a run shows and leaves for a person to read: its progress and summary tables (rich, on the main
process only), ``report.png`` and the label-error report.

``<output-dir>/report.png``: a run's learning curves and what cleaning flagged, as one picture.

Drawn from what the run wrote (``metrics.jsonl``, ``clean_before.json``, each iteration's
``cleaning.json``), so it can be redrawn for any finished run with `write_report`. Panels:
accuracy of student and mentor on validation and test; the training losses; the meta weight
and the learning rate; and, when the run cleaned or detected noise, how many images each
step flagged with the flags' precision and recall where the clean labels are known. With
``--iterations`` the top-level picture strings the iterations' epochs together, a dotted
line where each one starts. Needs matplotlib (``pip install 'noisy-meta[examples]'``).

``label_issues.csv`` and ``label_issues.png`` (`write_label_issues`): every training image
ranked by its area under the margin (`noisy_meta.AreaUnderMargin`, collected from the training
forwards at no extra cost), most suspicious first, with the class the student last predicted as
the suggested label; an image whose mean margin is below 0 (the student on average preferred
another class for it) is flagged. The picture shows the first flagged images with their given
and suggested class names.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
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

from .checkpoint import MetricsLog
from .settings import (
    CLEAN_BEFORE_FILE,
    CLEANING_FILE,
    LABEL_ISSUES_FILE,
    LABEL_ISSUES_PICTURE,
    METRICS_FILE,
    REPORT_FILE,
)

if TYPE_CHECKING:
    from datasets import Dataset

    from ..labels.dynamics import AreaUnderMargin

__all__ = [
    "EpochProgress",
    "LabelIssues",
    "iterations_table",
    "report_data",
    "summary_table",
    "write_label_issues",
    "write_report",
]

#: A training image is flagged when its mean margin on the given label is below this.
AUM_THRESHOLD = 0.0
#: Flagged images the picture shows (the most suspicious first).
PICTURE_IMAGES = 24

#: Colours by model, line styles by split.
_COLOURS = {"student": "tab:blue", "mentor": "tab:orange"}
_STYLES = {"val": "-", "test": "--"}


def report_data(output_dir: Path) -> tuple[list[dict[str, Any]], list[int], list[tuple[str, dict[str, Any]]]]:
    """What the picture shows: the epochs' records (iterations strung together), the positions where
    iterations start, and the cleaning steps as ``(name, detection report)``."""
    iteration_dirs = sorted(output_dir.glob("iteration_*"), key=lambda path: int(path.name.split("_")[-1]))
    run_dirs = [path for path in iteration_dirs if (path / METRICS_FILE).exists()] or [output_dir]
    records: list[dict[str, Any]] = []
    starts: list[int] = []
    steps: list[tuple[str, dict[str, Any]]] = []
    if (output_dir / CLEAN_BEFORE_FILE).exists():
        steps.append(("before training", _detection(output_dir / CLEAN_BEFORE_FILE)))
    for run_dir in run_dirs:
        if run_dir != output_dir:
            starts.append(len(records))
        if (run_dir / CLEANING_FILE).exists():
            steps.append((f"before {run_dir.name.replace('_', ' ')}", _detection(run_dir / CLEANING_FILE)))
        records += MetricsLog(run_dir / METRICS_FILE).read()
    return records, starts[1:], steps


def _detection(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())["detection"]


def write_report(output_dir: Path, title: str | None = None) -> Path | None:
    """Draw ``<output_dir>/report.png`` from the run's files; returns its path (None: no epoch yet).

    Raises ImportError (naming the extra) when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ImportError("report.png needs matplotlib: pip install 'noisy-meta[examples]'") from None
    records, starts, steps = report_data(output_dir)
    if not records:
        return None
    x = list(range(1, len(records) + 1))
    panels = 4 if steps else 3
    figure = Figure(figsize=(5.2 * panels, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    figure.get_layout_engine().set(w_pad=0.15)  # room between a twin axis' label and the next panel
    axes = figure.subplots(1, panels)
    accuracy, losses, schedule = axes[:3]

    for split in ("val", "test"):
        for who in ("student", "mentor"):
            key = f"{split}_{who}"
            if key in records[0]:
                values = [100 * record[key] for record in records]
                accuracy.plot(x, values, _STYLES[split], color=_COLOURS[who], marker=".", label=f"{split} {who}")
    accuracy.set(title="accuracy", xlabel="epoch", ylabel="top-1 accuracy (%)")
    accuracy.legend(loc="best", fontsize="small")

    for key, label in (("train_loss", "total"), ("train_ce_loss", "cross-entropy"), ("train_meta_loss", "meta")):
        if key in records[0]:
            losses.plot(x, [record[key] for record in records], marker=".", label=label)
    divergence = [record.get("fast_divergence") for record in records]
    if any(value is not None for value in divergence):  # None: an epoch without a meta step
        divergence = [math.nan if value is None else value for value in divergence]
        losses.plot(x, divergence, color="tab:purple", linestyle="--", marker=".", label="fast step's KL")
    losses.set(title="training loss (epoch mean)", xlabel="epoch", ylabel="loss")
    losses.legend(loc="best", fontsize="small")

    schedule.plot(x, [record["meta_weight"] for record in records], color="tab:green", marker=".", label="meta weight")
    schedule.set(title="meta weight and learning rate", xlabel="epoch", ylabel="meta weight (end of epoch)")
    rate = schedule.twinx()
    rate.plot(x, [record["lr"] for record in records], color="tab:gray", linestyle=":", label="learning rate")
    rate.set_ylabel("learning rate (end of epoch)")
    handles = schedule.get_legend_handles_labels()[0] + rate.get_legend_handles_labels()[0]
    schedule.legend(handles, [h.get_label() for h in handles], loc="best", fontsize="small")

    for axis in (accuracy, losses, schedule):
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        for start in starts:
            axis.axvline(start + 0.5, color="black", linestyle=":", linewidth=1)
    if steps:
        _cleaning_panel(axes[3], steps)
    figure.suptitle(title or output_dir.name, fontsize="large")
    path = output_dir / REPORT_FILE
    figure.savefig(path)
    return path


def _cleaning_panel(axis: Any, steps: list[tuple[str, dict[str, Any]]]) -> None:
    """Flagged counts per cleaning step, with precision and recall written above each bar."""
    names = [name for name, _ in steps]
    flagged = [detection["num_flagged"] for _, detection in steps]
    bars = axis.bar(names, flagged, color="tab:red", alpha=0.7)
    for bar, (_, detection) in zip(bars, steps):
        precision, recall = detection.get("precision"), detection.get("recall")
        text = f"{detection['num_flagged']} of {detection['num_samples']}"
        if precision is not None or recall is not None:
            text += f"\nprecision {_percent(precision)}\nrecall {_percent(recall)}"
        axis.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    axis.set(title="images flagged as mislabelled", ylabel="images flagged")
    axis.set_ylim(0, max(flagged + [1]) * 1.45)
    axis.grid(alpha=0.3, axis="y")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


@dataclass(frozen=True)
class LabelIssues:
    """What `write_label_issues` found: how many images it ranked and flagged, and, where the clean labels are
    known, how many flagged images are mislabelled (``precision``) and how many mislabelled ones it flagged
    (``recall``)."""

    num_samples: int
    num_flagged: int
    precision: float | None = None
    recall: float | None = None

    def line(self) -> str:
        text = f"{self.num_flagged} of {self.num_samples} training labels look wrong (mean margin < 0)"
        if self.precision is not None and self.recall is not None:
            text += f": precision {_percent(self.precision)}, recall {_percent(self.recall)} against the clean labels"
        return text


def write_label_issues(
    output_dir: Path,
    aum: AreaUnderMargin,
    train_set: Dataset,
    class_names: list[str] | None = None,
) -> LabelIssues:
    """``label_issues.csv`` (every training image seen, most suspicious first) and, with matplotlib,
    ``label_issues.png`` (the first flagged images) in ``output_dir``.

    Columns: ``rank``, ``index`` (the image's row in the training split as loaded), ``path`` (the image's file
    where the data set holds files, an imagefolder: only then), ``given_label``,
    ``suggested_label`` (the student's most recent prediction) and their class names where known, ``aum``
    (the mean margin on the given label: lower, more suspicious), ``times_seen``, ``flagged``, and
    ``clean_label`` where the data set knows it (injected noise, or a clean-label column; ``outside`` for an
    open-set image, empty where not known).
    """
    from ..labels.noisy_datasets import CLEAN_LABEL, INDEX, LABEL

    scores, seen, predicted = aum.scores, aum.counts_seen.numpy(), aum.predicted.numpy()
    index = np.asarray(train_set[INDEX])
    given = np.asarray(train_set[LABEL])
    clean = np.asarray(train_set[CLEAN_LABEL]) if CLEAN_LABEL in train_set.column_names else None
    if clean is not None and not (clean != -1).any():  # -1: not known (no noise injected, no clean-label column)
        clean = None
    rows = np.flatnonzero(seen[index] > 0)
    rows = rows[np.argsort(scores[index[rows]], kind="stable")]  # most suspicious first
    flagged = scores[index] < AUM_THRESHOLD

    def name(label: int) -> str:
        return class_names[label] if class_names and 0 <= label < len(class_names) else ""

    paths = _image_paths(train_set)
    header = ["rank", "index", *(["path"] if paths else []), "given_label", "given_name", "suggested_label"]
    header += ["suggested_name", "aum", "times_seen", "flagged", *(["clean_label"] if clean is not None else [])]
    with open(output_dir / LABEL_ISSUES_FILE, "w", newline="") as file:
        table = csv.writer(file, lineterminator="\n")
        table.writerow(header)
        for rank, row in enumerate(rows, 1):
            sample = index[row]
            fields = [rank, sample, *([paths[row] or ""] if paths else [])]
            fields += [given[row], name(given[row]), predicted[sample], name(predicted[sample])]
            fields += [f"{scores[sample]:.6g}", seen[sample], int(flagged[row])]
            table.writerow(fields + ([_clean_field(clean[row])] if clean is not None else []))

    precision = recall = None
    if clean is not None and (clean >= 0).all():
        wrong = given != clean
        precision = float((wrong & flagged).sum() / flagged.sum()) if flagged.any() else None
        recall = float((wrong & flagged).sum() / wrong.sum()) if wrong.any() else None
    shown = [row for row in rows if flagged[row]][:PICTURE_IMAGES]
    try:
        _label_issues_picture(output_dir / LABEL_ISSUES_PICTURE, train_set, shown, given, predicted[index], name)
    except ImportError:
        pass  # report.png says the extra is missing; the table is the report
    return LabelIssues(len(rows), int(flagged[rows].sum()), precision, recall)


def _image_paths(train_set: Dataset) -> list[str | None] | None:
    """Each training image's file path where the data set holds files (an imagefolder), else None. Reads the
    image column's Arrow storage a batch at a time (nothing decoded, cast or cached)."""
    import pyarrow as pa

    if "image" not in train_set.column_names:
        return None
    paths: list[str | None] = []
    for batch in train_set.select_columns(["image"]).with_format("arrow").iter(batch_size=1024):
        column = batch.column("image").combine_chunks()
        if not pa.types.is_struct(column.type) or column.type.get_field_index("path") < 0:
            return None
        paths += column.field("path").to_pylist()
    return paths if any(paths) else None


def _clean_field(label: int) -> str:
    """A clean label as the table writes it: the class, ``outside`` (open-set noise: no class is right) or empty
    (not known)."""
    from ..labels.noise import OUTSIDE

    return "outside" if label == OUTSIDE else ("" if label < 0 else str(label))


def _label_issues_picture(path: Path, train_set: Dataset, rows: list[int], given, suggested, name) -> None:
    """The flagged images as thumbnails, each captioned with its given and suggested labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = 6
    lines = max(1, math.ceil(len(rows) / columns))
    figure = Figure(figsize=(2.2 * columns, 2.5 * lines + 0.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = np.atleast_1d(figure.subplots(lines, columns)).ravel()
    images = train_set.select([int(row) for row in rows])["image"] if rows else []
    for axis, row, image in zip(axes, rows, images):
        pixels = np.asarray(image)
        axis.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None)
        given_text = name(int(given[row])) or str(given[row])
        suggested_text = name(int(suggested[row])) or str(suggested[row])
        axis.set_title(f"given {given_text}\nsuggested {suggested_text}", fontsize=10)
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
        if not axis.images:
            axis.axis("off")
    title = "the most suspicious training labels" if rows else "no training label looks wrong"
    figure.suptitle(f"{title} (label_issues.csv ranks them all)", fontsize="large")
    figure.savefig(path)


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
