"""``<output-dir>/report.png``: a run's learning curves and what cleaning flagged, as one picture.

Drawn from what the run wrote (``metrics.jsonl``, ``clean_before.json``, each iteration's
``cleaning.json``), so it can be redrawn for any finished run with `write_report`. Panels:
accuracy of student and mentor on validation and test; the training losses; the meta weight
and the learning rate; and, when the run cleaned or detected noise, how many images each
step flagged with the flags' precision and recall where the clean labels are known. With
``--iterations`` the top-level picture strings the iterations' epochs together, a dotted
line where each one starts. Needs matplotlib (``pip install 'noisy-meta[examples]'``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .checkpoint import MetricsLog
from .names import CLEAN_BEFORE_FILE, CLEANING_FILE, METRICS_FILE, REPORT_FILE

__all__ = ["report_data", "write_report"]

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
