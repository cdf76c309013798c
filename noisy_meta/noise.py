"""Synthetic label noise for experiments: symmetric, pair-flip, asymmetric class maps and
instance-dependent noise (Xia et al. 2020).

Every function is seeded and returns the noisy labels together with the realised noise rate
and the empirical transition matrix ``T[i, j]`` = fraction of class-``i`` samples labelled ``j``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

NOISE_KINDS = ("none", "symmetric", "pairflip", "asymmetric", "instance")

#: The standard asymmetric CIFAR-10 map (Patrini et al. 2017): truck -> automobile,
#: bird -> airplane, deer -> horse, cat <-> dog.
CIFAR10_ASYMMETRIC_MAP: dict[int, int] = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}


@dataclass(frozen=True)
class NoisyLabels:
    """Noisy labels with what it took to make them."""

    labels: np.ndarray
    clean_labels: np.ndarray
    realised_rate: float
    transition_matrix: np.ndarray

    @property
    def is_noisy(self) -> np.ndarray:
        return self.labels != self.clean_labels


def inject_noise(
    labels,
    num_classes: int,
    kind: str,
    rate: float,
    seed: int,
    *,
    include_true_class: bool = False,
    class_map: Mapping[int, int] | None = None,
    features=None,
) -> NoisyLabels:
    """Corrupt ``labels`` (integers in ``[0, num_classes)``) with label noise.

    Args:
        kind: ``"none"``; ``"symmetric"`` (each sample is chosen with probability ``rate`` and
            gets a uniformly random label); ``"pairflip"`` (chosen samples of class ``c`` get
            ``(c + 1) mod K``); ``"asymmetric"`` (chosen samples of a class in ``class_map`` get
            its image; default `CIFAR10_ASYMMETRIC_MAP`, which needs 10 classes).
            ``"instance"``: instance-dependent noise after Xia et al. (NeurIPS 2020), see
            `instance_dependent_labels`; needs ``features``.
        rate: the probability that a sample is chosen (for ``"instance"``: the mean flip rate).
        include_true_class: symmetric noise only. ``False`` (the "K-1" convention): the random
            label is never the true one, so the realised rate is ``rate``. ``True`` (the "K"
            convention): it may be, so the realised rate is ``rate * (K-1)/K``.
        features: ``[N, d]`` array describing each sample, for ``"instance"`` only (e.g. the
            flattened pixels, standardised).
    """
    clean = np.asarray(labels, dtype=np.int64)
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate!r}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    if clean.ndim != 1 or (clean.size and (clean.min() < 0 or clean.max() >= num_classes)):
        raise ValueError(f"labels must be a 1-D sequence of integers in [0, {num_classes})")
    if (features is not None) != (kind == "instance"):
        raise ValueError("features are needed for (and only for) kind='instance'")
    rng = np.random.default_rng(seed)
    if kind == "instance":
        noisy = instance_dependent_labels(clean, np.asarray(features), num_classes, rate, rng)
        return NoisyLabels(noisy, clean, _rate(clean, noisy), transition_matrix(clean, noisy, num_classes))
    chosen = rng.random(clean.shape[0]) < rate
    noisy = clean.copy()
    if kind == "symmetric":
        if include_true_class:
            noisy[chosen] = rng.integers(0, num_classes, int(chosen.sum()))
        else:  # a uniform offset in 1..K-1 never lands on the true class
            noisy[chosen] = (clean[chosen] + rng.integers(1, num_classes, int(chosen.sum()))) % num_classes
    elif kind == "pairflip":
        noisy[chosen] = (clean[chosen] + 1) % num_classes
    elif kind == "asymmetric":
        mapping = dict(CIFAR10_ASYMMETRIC_MAP if class_map is None else class_map)
        if class_map is None and num_classes != 10:
            raise ValueError("the built-in asymmetric map is CIFAR-10's (10 classes); pass class_map for other data")
        bad = [(a, b) for a, b in mapping.items() if not (0 <= a < num_classes and 0 <= b < num_classes)]
        if bad:
            raise ValueError(f"class_map entries outside [0, {num_classes}): {bad}")
        lookup = np.arange(num_classes)
        for source, target in mapping.items():
            lookup[source] = target
        noisy[chosen] = lookup[clean[chosen]]
    return NoisyLabels(noisy, clean, _rate(clean, noisy), transition_matrix(clean, noisy, num_classes))


def instance_dependent_labels(
    clean: np.ndarray,
    features: np.ndarray,
    num_classes: int,
    rate: float,
    rng: np.random.Generator,
    spread: float = 0.1,
) -> np.ndarray:
    """Instance-dependent noisy labels in the manner of Xia et al. (NeurIPS 2020).

    Each sample gets its own flip rate ``q_i`` from a normal distribution with mean ``rate``
    and standard deviation ``spread`` truncated to [0, 1]. Each class ``c`` has a random
    projection ``W_c`` (``[d, K]``, standard normal entries); the sample's scores over the
    other classes are ``x_i W_{y_i}`` (its own class excluded), and its label distribution is
    ``1 - q_i`` on ``y_i`` and ``q_i * softmax(scores)`` on the others. So which wrong label a
    sample gets, and how likely, depends on the sample itself.
    """
    num_samples = clean.shape[0]
    if features.ndim < 2 or features.shape[0] != num_samples:
        raise ValueError(f"features must be an [N, ...] array with N = {num_samples} rows, got shape {features.shape}")
    flat = features.reshape(num_samples, -1).astype(np.float64)
    if not np.isfinite(flat).all():
        raise ValueError("features must be finite")
    flip_rate = _truncated_normal(rng, rate, spread, num_samples)
    projections = rng.standard_normal((num_classes, flat.shape[1], num_classes))
    scores = np.empty((num_samples, num_classes))
    for c in range(num_classes):
        members = clean == c
        scores[members] = flat[members] @ projections[c]
    rows = np.arange(num_samples)
    scores[rows, clean] = -np.inf
    scores -= scores.max(axis=1, keepdims=True)
    probs = np.exp(scores)
    probs *= (flip_rate / probs.sum(axis=1))[:, None]
    probs[rows, clean] = 1.0 - flip_rate
    cumulative = probs.cumsum(axis=1)
    draws = rng.random(num_samples)[:, None] * cumulative[:, -1:]
    return np.minimum((cumulative <= draws).sum(axis=1), num_classes - 1).astype(np.int64)


def _truncated_normal(rng: np.random.Generator, mean: float, std: float, size: int) -> np.ndarray:
    """``size`` draws of N(mean, std^2) restricted to [0, 1] (by redrawing the rest)."""
    values = rng.normal(mean, std, size)
    outside = (values < 0) | (values > 1)
    while outside.any():
        values[outside] = rng.normal(mean, std, int(outside.sum()))
        outside = (values < 0) | (values > 1)
    return values


def _rate(clean: np.ndarray, noisy: np.ndarray) -> float:
    return float(np.mean(noisy != clean)) if clean.size else 0.0


def transition_matrix(clean, noisy, num_classes: int) -> np.ndarray:
    """Empirical ``T[i, j]``: fraction of samples of true class ``i`` labelled ``j`` (rows sum to 1)."""
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (np.asarray(clean), np.asarray(noisy)), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
