"""Noise detection before training: the neighbour vote, its chunked search, its quality and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from noisy_meta import detect_label_noise, extract_features, inject_noise

import helpers


def clusters(n_per_class=60, num_classes=4, dim=8, spread=0.3, seed=0):
    """Well separated Gaussian clusters: features that already tell the classes apart."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * 3
    labels = np.repeat(np.arange(num_classes), n_per_class)
    return centres[labels] + spread * rng.normal(size=(labels.size, dim)), labels


def test_the_vote_by_hand():
    """Five points on a line; k = 2: each sample's two nearest others vote."""
    features = np.array([[1.0, 0.0], [0.99, 0.1], [0.98, 0.2], [0.0, 1.0], [0.1, 0.99]])
    labels = np.array([0, 0, 1, 1, 1])
    found = detect_label_noise(features, labels, k=2)
    # sample 2's nearest two are samples 1 and 0 (both 0): flagged, suggested 0
    assert found.neighbors[2].tolist() == [1, 0]
    assert found.flagged.tolist() == [False, False, True, False, False]
    assert found.suggested_labels.tolist() == [0, 0, 0, 1, 1]
    # pred_probs = (votes + 1/C) / (k + 1): sample 2 has 2 votes for class 0, none for class 1
    np.testing.assert_allclose(found.pred_probs[2], [2.5 / 3, 0.5 / 3])
    np.testing.assert_allclose(found.scores[2], 1 - 0.5 / 3)
    np.testing.assert_allclose(found.pred_probs.sum(axis=1), 1.0)


def test_a_tie_keeps_the_given_label():
    features = np.array([[1.0, 0.0], [0.9, 0.1], [0.9, -0.1], [-1.0, 0.0]])
    labels = np.array([0, 0, 1, 1])
    found = detect_label_noise(features, labels, k=2)
    assert not found.flagged[0] and found.suggested_labels[0] == 0  # one vote each for 0 and 1


def test_finds_symmetric_noise_in_separable_features():
    features, clean = clusters()
    noisy = inject_noise(clean, 4, "symmetric", 0.4, seed=1).labels
    found = detect_label_noise(features, noisy, k=10, clean_labels=clean)
    assert found.report.num_noisy == int((noisy != clean).sum())
    assert found.report.f1 > 0.9 and found.report.precision > 0.9
    assert (found.suggested_labels[found.flagged] == clean[found.flagged]).mean() > 0.9


def test_chunked_search_equals_one_chunk():
    features, labels = clusters(seed=3)
    whole = detect_label_noise(features, labels, k=7, chunk_size=10_000)
    for chunk in (1, 17, 64):
        chunked = detect_label_noise(features, labels, k=7, chunk_size=chunk)
        np.testing.assert_array_equal(chunked.neighbors, whole.neighbors)
        np.testing.assert_array_equal(chunked.flagged, whole.flagged)


def test_threshold_flags_by_the_given_labels_share():
    features, clean = clusters(seed=4)
    noisy = inject_noise(clean, 4, "symmetric", 0.3, seed=2).labels
    found = detect_label_noise(features, noisy, k=10, threshold=0.5)
    given = found.pred_probs[np.arange(noisy.size), noisy]
    np.testing.assert_array_equal(found.flagged, given < 0.5)


def test_pred_probs_are_what_cleanlab_takes():
    cleanlab = pytest.importorskip("cleanlab.filter")
    features, clean = clusters(seed=5)
    noisy = inject_noise(clean, 4, "symmetric", 0.3, seed=3).labels
    found = detect_label_noise(features, noisy)
    issues = cleanlab.find_label_issues(noisy, found.pred_probs)
    assert issues.shape == noisy.shape and (issues & (noisy != clean)).sum() > 0.5 * (noisy != clean).sum()


def test_open_set_images_count_as_mislabelled():
    features, clean = clusters()
    clean = clean.copy()
    clean[:5] = -1
    found = detect_label_noise(features, np.where(clean < 0, 0, clean), clean_labels=clean)
    assert found.report.num_noisy == 5
    assert "precision" in found.summary()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(features=np.zeros((4, 2, 2))), "features must be"),
        (dict(labels=np.zeros(3)), "labels must be"),
        (dict(k=10), "k must be"),
        (dict(k=0), "k must be"),
        (dict(threshold=1.5), "threshold must be"),
        (dict(chunk_size=0), "chunk_size must be"),
        (dict(labels=np.array([0, 1, 2, 5, 0, 1])), "labels must lie in"),
        (dict(features=np.full((6, 2), np.nan)), "finite"),
        (dict(clean_labels=np.zeros(2)), "clean_labels must have"),
    ],
)
def test_bad_input_is_refused(kwargs, message):
    arguments = dict(features=np.random.default_rng(0).normal(size=(6, 2)), labels=np.array([0, 1, 2, 0, 1, 2]))
    arguments.update(kwargs)
    features, labels = arguments.pop("features"), arguments.pop("labels")
    with pytest.raises(ValueError, match=message):
        detect_label_noise(features, labels, num_classes=3, **{"k": 3, **arguments})


def test_extract_features_in_batches_equals_one_pass():
    torch.manual_seed(0)
    model = helpers.tiny_resnet()
    inputs, _ = helpers.image_batch(batch_size=10)
    one = extract_features(model, inputs, batch_size=100)
    assert one.shape == (10, model.num_features)
    torch.testing.assert_close(extract_features(model, inputs, batch_size=3), one, rtol=1e-5, atol=1e-6)
    loader = [(inputs[:4], None), (inputs[4:], None)]
    torch.testing.assert_close(extract_features(model, loader), one, rtol=1e-5, atol=1e-6)
    assert model.training  # the model's mode is left as it was
