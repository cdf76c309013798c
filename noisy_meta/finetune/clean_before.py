"""Cleaning the training split before training: ``--clean-before`` (detection with the starting weights) and
``--label-issues`` (an earlier run's report, `apply_label_issues`).

The starting model (``--pretrained`` / ``--checkpoint`` weights) embeds every training image
(eval transform, no augmentation); `noisy_meta.detect_label_noise` flags the images whose
nearest neighbours mostly carry another label (``--clean-before-threshold``: per-class
thresholds or the majority vote); the flagged images are removed from the training split,
relabelled with their neighbours' class, or masked: kept, with a ``label_kept`` column that
keeps their labels out of the loss on the labels while the meta step and the mentor still see
them. What was flagged is written to ``<output-dir>/clean_before.json`` (the flagged images'
``index``, the suggested labels, the detection quality where clean labels are known) and the
vote as cleanlab's ``pred_probs`` (``clean_before_pred_probs.npz``).

Every rank computes the same flags (same weights, same images, a deterministic search), so
the training split stays identical across processes. The draw of the classifier's random
initialisation is made under a forked RNG: the run's own model starts as it would without
``--clean-before``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from ..labels.cleaning import apply_flags, save_cleanlab_inputs
from ..labels.detection import LabelNoiseDetection, detect_label_noise, extract_features
from ..labels.noisy_datasets import CLEAN_LABEL, INDEX, IS_NOISY, LABEL
from .data import attach_transform, collate
from .models import create_model, transforms
from .names import CLEAN_BEFORE_FILE, CLEAN_BEFORE_PRED_PROBS
from .settings import RunContext


def clean_before_training(context: RunContext, train_set: Dataset, num_classes: int, output_dir: Path) -> Dataset:
    """The training split after ``--clean-before remove|relabel|mask``."""
    settings, accelerator, console = context.settings, context.accelerator, context.console
    action, k = settings.clean_before, settings.meta.clean_before_k
    threshold = settings.meta.clean_before_threshold
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        model = create_model(settings.model, num_classes)
    _, eval_transform = transforms(settings, model)
    loader = DataLoader(
        attach_transform(train_set, eval_transform),
        batch_size=2 * settings.optim.batch_size,
        collate_fn=collate,
        num_workers=settings.data.workers,
    )
    features = extract_features(model.to(accelerator.device), loader)
    labels = np.asarray(train_set[LABEL], dtype=np.int64)
    clean = np.asarray(train_set[CLEAN_LABEL], dtype=np.int64)  # OUTSIDE (< 0) for an open-set image
    known = clean if all(value is not None for value in train_set[IS_NOISY]) else None
    vote = None if threshold == "majority" else threshold
    found = detect_label_noise(features, labels, num_classes=num_classes, k=k, threshold=vote, clean_labels=known)
    cleaned, per_class, relabelled_correct = apply_flags(
        train_set, found.flagged, found.suggested_labels, action, num_classes
    )
    seconds = time.perf_counter() - started
    left = f"{int((~found.flagged).sum())} labels" if action == "mask" else f"{len(cleaned)} training images"
    console.print(
        f"--clean-before {action}: {found.summary()}; {left} left "
        f"({seconds:.1f} s; flags in {output_dir / CLEAN_BEFORE_FILE})"
    )
    if accelerator.is_main_process:
        index = np.asarray(train_set[INDEX], dtype=np.int64)
        _write(output_dir, action, k, threshold, found, labels, index, per_class, relabelled_correct, seconds)
    return cleaned


def _write(
    output_dir: Path,
    action: str,
    k: int,
    threshold: str,
    found: LabelNoiseDetection,
    labels: np.ndarray,
    index: np.ndarray,
    per_class: list[int],
    relabelled_correct: int | None,
    seconds: float,
) -> None:
    flagged = np.flatnonzero(found.flagged)
    record = {
        "action": action,
        "k": k,
        "threshold": threshold,
        "detection": vars(found.report),
        "remaining_per_class": per_class,
        "relabelled_correct": relabelled_correct,
        "seconds": seconds,
        "flagged_index": index[flagged].tolist(),
        "suggested_label": found.suggested_labels[flagged].tolist(),
        "score": [round(float(s), 4) for s in found.scores[flagged]],
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CLEAN_BEFORE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    save_cleanlab_inputs(output_dir / CLEAN_BEFORE_PRED_PROBS, labels, found.pred_probs, index)


def apply_label_issues(context: RunContext, train_set: Dataset, num_classes: int) -> Dataset:
    """The training split after ``--label-issues CSV --label-issues-action remove|relabel|mask``.

    The rows of the table whose ``flagged`` is 1 are acted on (edit the table to change which: a row deleted or
    set to 0 stays as it is; a ``suggested_label`` changed is the label ``relabel`` gives). The table must come
    from a run on the same training split: every row's ``index`` must be in the split, with the same given
    label, else the run is refused before training.
    """
    import csv

    settings, console = context.settings, context.console
    path, action = Path(settings.meta.label_issues).expanduser(), settings.meta.label_issues_action
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    needed = {"index", "given_label", "suggested_label", "flagged"}
    if not rows or not needed <= set(rows[0]):
        raise ValueError(f"--label-issues {path}: not a label_issues.csv (it needs the columns {sorted(needed)})")
    index = np.asarray(train_set[INDEX], dtype=np.int64)
    labels = np.asarray(train_set[LABEL], dtype=np.int64)
    row_of = {int(value): row for row, value in enumerate(index)}
    flagged = np.zeros(len(index), dtype=bool)
    suggested = labels.copy()
    for line, entry in enumerate(rows, 2):
        row = row_of.get(int(entry["index"]))
        if row is None or int(entry["given_label"]) != labels[row]:
            raise ValueError(
                f"--label-issues {path}, line {line}: image {entry['index']} with label {entry['given_label']} is not "
                "in this training split; was the table written by a run on the same data, noise and seed?"
            )
        if entry["flagged"].strip() == "1":
            flagged[row] = True
            label = int(entry["suggested_label"])
            if not 0 <= label < num_classes:
                raise ValueError(f"--label-issues {path}, line {line}: suggested_label {label} is not a class")
            suggested[row] = label
    cleaned, _, relabelled_correct = apply_flags(train_set, flagged, suggested, action, num_classes)
    left = f"{int((~flagged).sum())} labels" if action == "mask" else f"{len(cleaned)} training images"
    correct = f", {relabelled_correct} of them to their true class" if relabelled_correct is not None else ""
    console.print(f"--label-issues {action}: {int(flagged.sum())} flagged in {path}{correct}; {left} left")
    return cleaned
