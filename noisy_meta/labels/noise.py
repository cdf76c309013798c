"""Synthetic label noise for experiments: symmetric, pair-flip, asymmetric class maps,
instance-dependent noise (Xia et al. 2020) and open-set noise (images from outside the label space).

Every function is seeded and returns the noisy labels together with the realised noise rate
and the empirical transition matrix ``T[i, j]`` = fraction of class-``i`` samples labelled ``j``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

NOISE_KINDS = ("none", "symmetric", "pairflip", "asymmetric", "instance")
#: Open-set noise changes which images a data set holds, not only their labels: `open_set_noise`.
OPEN_SET = "open_set"

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
    features: np.ndarray | None = None,
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
    if kind == OPEN_SET:
        raise ValueError("open-set noise replaces images, not only labels: use open_set_noise")
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


#: ``clean_labels`` value of an image from outside the label space (open-set noise): no label is right.
OUTSIDE = -2


@dataclass(frozen=True)
class OpenSetNoise:
    """A training set after open-set noise: which input rows it keeps, and their labels.

    ``rows`` index the input in its original order. ``labels`` are in the reduced label space
    (the classes not named outside, renumbered by ``class_map``); ``clean_labels`` likewise, and
    `OUTSIDE` for the images that come from outside the space.
    """

    rows: np.ndarray
    labels: np.ndarray
    clean_labels: np.ndarray
    class_map: dict[int, int]
    realised_rate: float

    @property
    def is_outside(self) -> np.ndarray:
        return self.clean_labels == OUTSIDE

    @property
    def num_classes(self) -> int:
        return len(self.class_map)


def class_map_without(num_classes: int, outside_classes) -> dict[int, int]:
    """``{old class: new class}`` for the classes not in ``outside_classes``, in order."""
    outside = sorted({int(c) for c in outside_classes})
    bad = [c for c in outside if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"open-set classes must be in [0, {num_classes}), got {bad}")
    kept = [c for c in range(num_classes) if c not in outside]
    if not outside or len(kept) < 2:
        raise ValueError(
            f"open-set noise needs at least one outside class and 2 classes left; got outside {outside} "
            f"of {num_classes} classes"
        )
    return {old: new for new, old in enumerate(kept)}


def open_set_noise(labels, num_classes: int, outside_classes, rate: float, seed: int) -> OpenSetNoise:
    """Open-set label noise, web data's typical error: images of no class of the label space,
    each labelled with a class of it.

    The classes in ``outside_classes`` leave the label space (the others are renumbered in
    order). Their images are the outside pool: a fraction ``rate`` of the in-space images is
    replaced by as many pool images, each with a uniformly random in-space label, so the data
    set keeps its in-space size and ``rate`` of it comes from outside. The rest of the pool is
    dropped. Raises ValueError when the pool holds fewer images than the rate needs.
    """
    clean = np.asarray(labels, dtype=np.int64)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"open-set noise rate must be in [0, 1), got {rate!r}")
    if clean.ndim != 1 or (clean.size and (clean.min() < 0 or clean.max() >= num_classes)):
        raise ValueError(f"labels must be a 1-D sequence of integers in [0, {num_classes})")
    class_map = class_map_without(num_classes, outside_classes)
    lookup = np.full(num_classes, OUTSIDE, dtype=np.int64)
    lookup[list(class_map)] = list(class_map.values())
    mapped = lookup[clean]
    inside, pool = np.flatnonzero(mapped != OUTSIDE), np.flatnonzero(mapped == OUTSIDE)
    needed = int(round(rate * inside.size))
    if needed > pool.size:
        raise ValueError(
            f"open-set noise at rate {rate} replaces {needed} of {inside.size} in-space images, but the outside "
            f"classes have only {pool.size} images; lower the rate (at most {pool.size / max(inside.size, 1):.2f}) "
            "or name more outside classes"
        )
    rng = np.random.default_rng(seed)
    replaced = rng.choice(inside, needed, replace=False)
    brought_in = rng.choice(pool, needed, replace=False)
    rows = np.sort(np.concatenate([np.setdiff1d(inside, replaced), brought_in]))
    clean_labels = mapped[rows]
    noisy = clean_labels.copy()
    outside = clean_labels == OUTSIDE
    noisy[outside] = rng.integers(0, len(class_map), int(outside.sum()))
    return OpenSetNoise(rows, noisy, clean_labels, class_map, needed / max(inside.size, 1))


def confusion_labels(labels, pred_probs, rate: float, seed: int) -> np.ndarray:
    """Instance-dependent noise from a model's own confusions: the samples a model finds
    confusable get the classes it confuses them with.

    ``pred_probs`` (``[N, K]``) are a model's held-out class probabilities (e.g. cross-validated,
    so it has not seen the sample's label). ``round(rate * N)`` samples are chosen without
    replacement with probability proportional to the mass the model puts on wrong classes, and
    each gets a wrong class drawn in proportion to that mass; so the realised rate is ``rate``
    and the errors follow the model's: look-alike images swap labels, distinctive ones keep theirs.
    """
    clean = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(pred_probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != clean.shape[0] or clean.ndim != 1:
        raise ValueError(f"pred_probs must be [N, K] with N = {clean.shape[0]} labels, got shape {probs.shape}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate!r}")
    if clean.size and (clean.min() < 0 or clean.max() >= probs.shape[1]):
        raise ValueError(f"labels must be integers in [0, {probs.shape[1]})")
    rows = np.arange(clean.size)
    wrong = np.clip(probs, 0.0, None) + 1e-12  # every wrong class stays possible
    wrong[rows, clean] = 0.0
    mass = wrong.sum(axis=1)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(clean.size, int(round(rate * clean.size)), replace=False, p=mass / mass.sum())
    noisy = clean.copy()
    cumulative = (wrong[chosen] / mass[chosen, None]).cumsum(axis=1)
    draws = rng.random(chosen.size)[:, None]
    noisy[chosen] = np.minimum((cumulative <= draws).sum(axis=1), probs.shape[1] - 1)
    return noisy
