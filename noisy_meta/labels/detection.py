"""Noise detection before training: a nearest-neighbour vote over pretrained features.

A pretrained backbone's pooled features already put images of one class near each other
before any fine-tuning, so a sample whose nearest neighbours mostly carry another label is
probably mislabelled (SimiFeat: Zhu, Dong & Liu, "Detecting corrupted labels without training
a model to predict", ICML 2022). `detect_label_noise` takes such features and the given labels
and returns, per sample, the neighbours' label distribution (in cleanlab's ``pred_probs``
format, out of sample by construction: a sample never votes for itself), a score and a flag.
`extract_features` computes the features in batches with the starting weights.

The neighbour search runs over row chunks: memory is ``chunk_size x N`` similarities at a
time, never ``N x N``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..features import features_of
from .cleaning import DetectionReport


@dataclass(frozen=True)
class LabelNoiseDetection:
    """What `detect_label_noise` found.

    Attributes:
        pred_probs: ``[N, C]`` the neighbours' vote for each class, ``(votes + 1/C) / (k + 1)``
            (one pseudo-vote spread over the classes, so no probability is 0): rows sum to 1,
            the format ``cleanlab.filter.find_label_issues(labels, pred_probs)`` takes.
        scores: ``[N]`` ``1 - pred_probs[i, labels[i]]``: higher is more likely mislabelled
            (rank by it to review the worst first).
        flagged: ``[N]`` bool, the samples judged mislabelled.
        suggested_labels: ``[N]`` the class most neighbours carry (ties: the given label if
            it is among the most voted, else the lowest class).
        neighbors: ``[N, k]`` each sample's nearest other samples, nearest first.
        report: precision / recall / F1 of ``flagged`` against the clean labels when they
            were given (`noisy_meta.labels.cleaning.DetectionReport`; ``None`` entries otherwise).
    """

    pred_probs: np.ndarray
    scores: np.ndarray
    flagged: np.ndarray
    suggested_labels: np.ndarray
    neighbors: np.ndarray
    report: DetectionReport

    def summary(self) -> str:
        """One line: how many were flagged, and how well where the clean labels are known."""
        report = self.report
        share = report.num_flagged / report.num_samples
        line = f"{report.num_flagged} of {report.num_samples} samples flagged ({share:.1%})"
        if report.num_noisy is not None:
            line += f"; {report.num_noisy} truly mislabelled: precision {_percent(report.precision)}, "
            line += f"recall {_percent(report.recall)}, F1 {report.f1:.3f}" if report.f1 is not None else "F1 n/a"
        return line


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def detect_label_noise(
    features: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    k: int = 10,
    threshold: float | Literal["per_class"] | None = None,
    clean_labels: np.ndarray | None = None,
    chunk_size: int = 1024,
) -> LabelNoiseDetection:
    """Flag samples whose nearest neighbours in feature space mostly carry another label.

    Args:
        features: ``[N, D]`` (tensor or array), e.g. a pretrained backbone's pooled features
            (`extract_features`). Compared by cosine similarity, on the features' device.
        labels: ``[N]`` the given (possibly noisy) labels, integers in ``[0, num_classes)``.
        num_classes: C; default ``max(labels) + 1``.
        k: neighbours per sample (itself excluded). Larger k is steadier at high noise
            rates and blurs small classes; k must be below N.
        threshold: ``None`` (the default, SimiFeat's vote): flag a sample when some other
            class has strictly more neighbour votes than its given label. ``"per_class"``
            (confident learning's thresholds, read from the data): each class's threshold
            ``t_c`` is the mean vote for ``c`` among the samples labelled ``c`` (how much the
            features agree with that class's labels); flag a sample when the vote for its
            given label is below its class's threshold *and* the vote for some other class
            ``j`` reaches ``t_j``. Features that mix the classes lower every threshold
            together, so a clean training set on weak features loses few samples where the
            majority vote flags many. A number in (0, 1]: flag when
            ``pred_probs[i, labels[i]] < threshold``.
        clean_labels: ``[N]`` the true labels where known (a noisy-label benchmark), to
            measure the flags' precision, recall and F1 in ``report``. A negative entry (an
            open-set image with no true class) counts as mislabelled.
        chunk_size: rows per chunk of the neighbour search (memory ``chunk_size x N``).

    Returns:
        A `LabelNoiseDetection`.
    """
    features = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
    labels = torch.as_tensor(np.asarray(labels)).long().cpu()
    if features.dim() != 2:
        raise ValueError(f"features must be [N, D], got shape {list(features.shape)}")
    n = features.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must be [N] = [{n}] (one per feature row), got shape {list(labels.shape)}")
    if not features.is_floating_point() or not torch.isfinite(features).all():
        raise ValueError("features must be finite floating-point numbers")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < n:
        raise ValueError(f"k must be an integer in [1, N - 1] = [1, {n - 1}], got {k!r}")
    number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
    if not (threshold is None or threshold == "per_class" or (number and 0 < threshold <= 1)):
        raise ValueError(f"threshold must be None (majority vote), 'per_class' or in (0, 1], got {threshold!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")

    neighbors = _nearest_neighbors(F.normalize(features.float(), dim=1), k, chunk_size).cpu()  # [N, k]
    votes = F.one_hot(labels[neighbors], num_classes).sum(dim=1).double()  # [N, C]
    pred_probs = (votes + 1.0 / num_classes) / (k + 1.0)
    given = pred_probs.gather(1, labels[:, None]).squeeze(1)
    top = pred_probs.max(dim=1).values
    suggested = torch.where(given >= top, labels, pred_probs.argmax(dim=1))
    if threshold is None:
        flagged = given < top
    elif threshold == "per_class":
        flagged = _below_class_thresholds(pred_probs, labels, given)
    else:
        flagged = given < threshold
    report = DetectionReport.measure(flagged.numpy(), _is_noisy(labels, clean_labels))
    return LabelNoiseDetection(
        pred_probs.numpy(), (1.0 - given).numpy(), flagged.numpy(), suggested.numpy(), neighbors.numpy(), report
    )


def _below_class_thresholds(pred_probs: torch.Tensor, labels: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """Confident learning's rule: the given label's vote below its class's mean self-vote, and some other
    class's vote at or above that class's (a class with no sample has threshold 1: it is never reached)."""
    num_classes = pred_probs.shape[1]
    sums = torch.zeros(num_classes, dtype=pred_probs.dtype).index_add_(0, labels, given)
    counts = torch.bincount(labels, minlength=num_classes).to(pred_probs.dtype)
    thresholds = torch.where(counts > 0, sums / counts.clamp(min=1), torch.ones_like(sums))
    others = pred_probs.scatter(1, labels[:, None], -1.0)
    return (given < thresholds[labels]) & (others >= thresholds).any(dim=1)


def _is_noisy(labels: torch.Tensor, clean_labels) -> np.ndarray | None:
    if clean_labels is None:
        return None
    clean = np.asarray(clean_labels)
    if clean.shape != tuple(labels.shape):
        raise ValueError(f"clean_labels must have the labels' shape {list(labels.shape)}, got {list(clean.shape)}")
    return (clean != labels.numpy()) | (clean < 0)


def _nearest_neighbors(unit: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """``[N, k]`` indices of each row's k most similar other rows (cosine), nearest first, in chunks."""
    parts = []
    for start in range(0, unit.shape[0], chunk_size):
        block = unit[start : start + chunk_size] @ unit.T  # [chunk, N]
        rows = torch.arange(block.shape[0], device=block.device)
        block[rows, rows + start] = -float("inf")  # never one's own neighbour
        parts.append(block.topk(k, dim=1).indices)
    return torch.cat(parts)


@torch.no_grad()
def extract_features(model: nn.Module, inputs: torch.Tensor | Iterable, *, batch_size: int = 256) -> torch.Tensor:
    """Eval-mode pooled pre-logits features (timm models; other models: their outputs), ``[N, D]`` on the CPU.

    ``inputs`` is a tensor ``[N, ...]`` (split into ``batch_size`` batches on the model's
    device) or an iterable of batches (tensors, or ``(inputs, ...)`` tuples / dicts with
    ``"pixel_values"``, as data loaders give them).
    """
    device = next(model.parameters()).device
    if torch.is_tensor(inputs):
        batches: Iterable = inputs.split(batch_size)
    else:
        batches = inputs
    parts = []
    for batch in batches:
        if isinstance(batch, dict):
            batch = batch["pixel_values"]
        elif isinstance(batch, (tuple, list)):
            batch = batch[0]
        parts.append(features_of(model, batch.to(device)).float().flatten(1).cpu())
    if not parts:
        raise ValueError("no inputs to extract features from")
    return torch.cat(parts)
