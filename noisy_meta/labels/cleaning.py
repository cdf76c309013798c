"""Data cleaning with a trained mentor: the second stage of MLNT's iterative training.

After a training run, the mentor predicts every training sample; samples it judges
mislabelled are removed (or relabelled) before the next run, which starts with that mentor.
The criterion is explicit (`CleaningConfig`), its quality is measured against clean labels
where they are known (`DetectionReport`), and the mentor's probabilities can be exported in
the format ``cleanlab.filter.find_label_issues(labels, pred_probs)`` takes.

Note that the mentor has trained on the samples it judges: its probabilities are in-sample,
not the out-of-sample (cross-validated) ones cleanlab ideally wants, so they are more
confident in the given labels than held-out predictions would be.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..features import eval_mode
from .cleaning_config import CLEANING_ACTIONS, CLEANING_CRITERIA, CleaningConfig
from .noisy_datasets import CLEAN_LABEL, INDEX, IS_NOISY, LABEL

if TYPE_CHECKING:
    from datasets import Dataset


def find_label_issues(labels, pred_probs, *, config: CleaningConfig | None = None) -> np.ndarray:
    """Boolean mask ``[N]`` of the samples the mentor judges mislabelled.

    Called as ``cleanlab.filter.find_label_issues`` is: ``labels`` ``[N]`` are the given
    labels, ``pred_probs`` ``[N, K]`` the mentor's probabilities (rows summing to 1), options
    keyword-only. ``config`` (a `CleaningConfig`) picks the criterion; the default flags every
    sample whose mentor top-1 class is not its label.
    """
    return _flags(*_checked(labels, pred_probs), CleaningConfig() if config is None else config)


def _flags(labels: np.ndarray, pred_probs: np.ndarray, config: CleaningConfig) -> np.ndarray:
    """`find_label_issues` on arrays `_checked` already validated."""
    given = pred_probs[np.arange(labels.shape[0]), labels]
    if config.criterion == "given_label_prob":
        return given < config.threshold
    top = pred_probs.argmax(axis=1)
    return (top != labels) & (pred_probs.max(axis=1) > config.threshold)


@dataclass(frozen=True)
class DetectionReport:
    """How well the flagged set matches the truly mislabelled samples.

    Precision, recall and F1 are None when the clean labels are unknown (or, for precision,
    when nothing was flagged; for recall, when nothing is noisy).
    """

    num_samples: int
    num_flagged: int
    num_noisy: int | None
    precision: float | None
    recall: float | None
    f1: float | None

    @classmethod
    def measure(cls, flagged, is_noisy=None) -> DetectionReport:
        flagged = np.asarray(flagged, dtype=bool)
        if is_noisy is None or any(value is None for value in is_noisy):
            return cls(int(flagged.size), int(flagged.sum()), None, None, None, None)
        noisy = np.asarray(is_noisy, dtype=bool)
        if noisy.shape != flagged.shape:
            raise ValueError(f"is_noisy has shape {noisy.shape}, the flags {flagged.shape}")
        hits = int((flagged & noisy).sum())
        precision = hits / int(flagged.sum()) if flagged.any() else None
        recall = hits / int(noisy.sum()) if noisy.any() else None
        f1 = None
        if precision is not None and recall is not None:
            f1 = 0.0 if hits == 0 else 2 * precision * recall / (precision + recall)
        return cls(int(flagged.size), int(flagged.sum()), int(noisy.sum()), precision, recall, f1)


@dataclass(frozen=True)
class CleaningReport:
    """What one cleaning step did: its config, detection quality and the data left."""

    config: CleaningConfig
    detection: DetectionReport
    remaining_per_class: list[int]
    relabelled_correct: int | None = None  # relabel only, where clean labels are known
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def clean_dataset(
    dataset: Dataset, pred_probs, config: CleaningConfig, num_classes: int | None = None
) -> tuple[Dataset, CleaningReport]:
    """Apply ``config`` to ``dataset`` (with `noisy_meta.labels.noisy_datasets` label columns).

    Row ``i`` of ``pred_probs`` is the mentor's prediction for row ``i`` of ``dataset``. Removed
    rows are dropped; relabelled rows get the mentor's top-1 class as ``label`` (and an
    updated ``is_noisy``). The ``index`` column keeps each sample's original position.
    """
    missing = [c for c in (LABEL, CLEAN_LABEL, IS_NOISY, INDEX) if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"the data set lacks the label columns {missing}; prepare it with noisy_meta.labels.noisy_datasets"
        )
    labels, pred_probs = _checked(dataset[LABEL], pred_probs)
    if labels.shape[0] != len(dataset):
        raise ValueError(f"pred_probs has {labels.shape[0]} rows for a data set of {len(dataset)}")
    num_classes = num_classes or pred_probs.shape[1]
    flagged = _flags(labels, pred_probs, config)
    detection = DetectionReport.measure(flagged, dataset[IS_NOISY])
    result, counts, relabelled_correct = apply_flags(
        dataset, flagged, pred_probs.argmax(axis=1), config.action, num_classes
    )
    return result, CleaningReport(config, detection, counts, relabelled_correct)


#: The column `apply_flags` adds for ``action="mask"``: whether the loss on the labels uses the row's label.
LABEL_KEPT = "label_kept"


def apply_flags(
    dataset: Dataset, flagged: np.ndarray, suggested: np.ndarray, action: str, num_classes: int
) -> tuple[Dataset, list[int], int | None]:
    """``dataset`` with the ``flagged`` rows removed, relabelled with ``suggested`` (``is_noisy`` updated), or
    masked: every row kept, with a `LABEL_KEPT` column (False where flagged) for the loss on the labels.

    Returns the new data set, the samples left per class, and (relabel, clean labels known) how
    many relabelled samples got their true class.
    """
    labels = np.asarray(dataset[LABEL], dtype=np.int64)
    clean = np.asarray(dataset[CLEAN_LABEL], dtype=np.int64)
    relabelled_correct = None
    if action == "remove":
        result = dataset.select(np.flatnonzero(~flagged))
        remaining = labels[~flagged]
    elif action == "mask":
        result = dataset.add_column(LABEL_KEPT, (~np.asarray(flagged, dtype=bool)).tolist())
        remaining = labels[~flagged]
    else:
        new_labels = np.where(flagged, suggested, labels)
        if (clean >= 0).all():
            relabelled_correct = int((new_labels[flagged] == clean[flagged]).sum())
        is_noisy = [bool(n != c) if c >= 0 else None for n, c in zip(new_labels, clean)]
        result = dataset.remove_columns([LABEL, IS_NOISY])
        result = result.add_column(LABEL, new_labels.tolist()).add_column(IS_NOISY, is_noisy)
        result = result.cast(dataset.features).select_columns(dataset.column_names)
        remaining = new_labels
    return result, np.bincount(remaining, minlength=num_classes).tolist(), relabelled_correct


def predict_probabilities(model: nn.Module, batches: Iterable[torch.Tensor]) -> np.ndarray:
    """Softmax probabilities ``[N, K]`` (float64) of ``model`` in eval mode over input batches, in order."""
    rows = [probs.double().cpu() for probs in iter_probabilities(model, batches)]
    if not rows:
        raise ValueError("no batches to predict")
    return torch.cat(rows).numpy()


def iter_probabilities(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Iterator[torch.Tensor]:
    """Softmax probabilities (float32, on the model's device) of each input batch, ``model`` in eval mode.

    ``autocast``: a context for the forward (e.g. ``accelerator.autocast``). The model's own
    train/eval modes are restored when the iteration ends.
    """
    with torch.no_grad(), eval_mode(model):
        for inputs in batches:
            with autocast():
                logits = model(inputs)
            yield torch.softmax(logits.float(), dim=1)


def save_cleanlab_inputs(path: str | os.PathLike, labels, pred_probs, indices=None) -> None:
    """Write ``labels`` and ``pred_probs`` (and the samples' ``index``) to an ``.npz`` file.

    ``np.load(path)`` then gives what cleanlab takes:
    ``cleanlab.filter.find_label_issues(labels=data["labels"], pred_probs=data["pred_probs"])``.
    """
    labels, pred_probs = _checked(labels, pred_probs)
    indices = np.arange(labels.shape[0]) if indices is None else np.asarray(indices, dtype=np.int64)
    if indices.shape != labels.shape:
        raise ValueError(f"indices has shape {indices.shape}, labels {labels.shape}")
    np.savez(path, labels=labels, pred_probs=pred_probs, index=indices)


def iterate_with_cleaning(
    dataset: Dataset,
    iterations: int,
    train: Callable[[Dataset, int, nn.Module | None], nn.Module],
    predict: Callable[[nn.Module, Dataset], np.ndarray],
    config: CleaningConfig,
) -> list[CleaningReport]:
    """MLNT's iterative training: ``iterations`` training runs with cleaning in between.

    ``train(train_set, iteration, mentor)`` runs one full training (``mentor`` is None in
    the first iteration, then the previous run's best mentor) and returns its best mentor.
    Before every run but the first, that mentor judges the *original* ``dataset`` (so a sample
    dropped once can come back) with ``predict(mentor, dataset) -> pred_probs`` and
    `clean_dataset` makes the next training set. Returns the cleaning reports, one per
    iteration after the first.
    """
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    reports = []
    train_set, mentor = dataset, None
    for iteration in range(iterations):
        if iteration:
            train_set, report = clean_dataset(dataset, predict(mentor, dataset), config)
            if len(train_set) == 0:
                raise ValueError(f"cleaning before iteration {iteration + 1} removed every sample; raise the threshold")
            reports.append(report)
        mentor = train(train_set, iteration, mentor)
    return reports


def _checked(labels, pred_probs) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    pred_probs = np.asarray(pred_probs, dtype=np.float64)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D array of class indices, got shape {labels.shape} ({labels.dtype})")
    if pred_probs.ndim != 2 or pred_probs.shape[0] != labels.shape[0]:
        raise ValueError(f"pred_probs must be [N, K] with N = {labels.shape[0]}, got {pred_probs.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= pred_probs.shape[1]):
        raise ValueError(f"labels must lie in [0, {pred_probs.shape[1]}) (the columns of pred_probs)")
    sums = pred_probs.sum(axis=1)
    if not np.isfinite(pred_probs).all() or (pred_probs < 0).any() or not np.allclose(sums, 1.0, atol=1e-4):
        raise ValueError("pred_probs rows must be finite probabilities summing to 1 (softmax outputs)")
    return labels.astype(np.int64), pred_probs


__all__ = [
    "CLEANING_ACTIONS",
    "CLEANING_CRITERIA",
    "CleaningConfig",
    "CleaningReport",
    "DetectionReport",
    "clean_dataset",
    "find_label_issues",
    "iter_probabilities",
    "iterate_with_cleaning",
    "predict_probabilities",
    "save_cleanlab_inputs",
]
