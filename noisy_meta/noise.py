"""Synthetic label noise for experiments: symmetric, pair-flip and asymmetric class maps.

Every function is seeded and returns the noisy labels together with the realised noise rate
and the empirical transition matrix ``T[i, j]`` = fraction of class-``i`` samples labelled ``j``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

NOISE_KINDS = ("none", "symmetric", "pairflip", "asymmetric")

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
) -> NoisyLabels:
    """Corrupt ``labels`` (integers in ``[0, num_classes)``) with label noise.

    Args:
        kind: ``"none"``; ``"symmetric"`` (each sample is chosen with probability ``rate`` and
            gets a uniformly random label); ``"pairflip"`` (chosen samples of class ``c`` get
            ``(c + 1) mod K``); ``"asymmetric"`` (chosen samples of a class in ``class_map`` get
            its image; default `CIFAR10_ASYMMETRIC_MAP`, which needs 10 classes).
        rate: the probability that a sample is chosen.
        include_true_class: symmetric noise only. ``False`` (the "K-1" convention): the random
            label is never the true one, so the realised rate is ``rate``. ``True`` (the "K"
            convention): it may be, so the realised rate is ``rate * (K-1)/K``.
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
    rng = np.random.default_rng(seed)
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
    return NoisyLabels(noisy, clean, float(np.mean(noisy != clean)) if clean.size else 0.0, transition_matrix(clean, noisy, num_classes))


def transition_matrix(clean, noisy, num_classes: int) -> np.ndarray:
    """Empirical ``T[i, j]``: fraction of samples of true class ``i`` labelled ``j`` (rows sum to 1)."""
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (np.asarray(clean), np.asarray(noisy)), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
