"""Data cleaning with a mentor: criteria, detection quality, the cleaned data, cleanlab export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from torch import nn

from noisy_meta.labels.cleaning import (
    CleaningConfig,
    DetectionReport,
    clean_dataset,
    find_label_issues,
    iterate_with_cleaning,
    predict_probabilities,
    save_cleanlab_inputs,
)
from noisy_meta.labels.noisy_datasets import add_label_noise


def random_probs(n: int = 200, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, k)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return rng.integers(0, k, n), probs


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.6])
def test_confident_disagreement_against_a_loop(threshold):
    labels, probs = random_probs()
    flagged = find_label_issues(labels, probs, config=CleaningConfig("confident_disagreement", threshold))
    expected = [int(np.argmax(p)) != y and p.max() > threshold for y, p in zip(labels, probs)]
    assert flagged.tolist() == expected and 0 < flagged.sum() < len(labels)


@pytest.mark.parametrize("threshold", [0.1, 0.5, 1.0])
def test_given_label_probability_against_a_loop(threshold):
    labels, probs = random_probs(seed=1)
    flagged = find_label_issues(labels, probs, config=CleaningConfig("given_label_prob", threshold))
    assert flagged.tolist() == [p[y] < threshold for y, p in zip(labels, probs)]


def test_find_label_issues_is_called_as_cleanlab_calls_it():
    """``(labels, pred_probs)`` positionally, options keyword-only; the default flags top-1 disagreement."""
    labels, probs = random_probs(seed=2)
    assert find_label_issues(labels, probs).tolist() == [int(np.argmax(p)) != y for y, p in zip(labels, probs)]
    with pytest.raises(TypeError):
        find_label_issues(labels, probs, CleaningConfig())  # a positional config is refused, not misread


def test_detection_report_by_hand():
    flagged = np.array([1, 1, 1, 0, 0, 0, 0, 1], dtype=bool)
    noisy = np.array([1, 1, 0, 1, 0, 0, 0, 0], dtype=bool)
    report = DetectionReport.measure(flagged, noisy)
    assert (report.num_flagged, report.num_noisy) == (4, 3)
    assert report.precision == pytest.approx(2 / 4) and report.recall == pytest.approx(2 / 3)
    assert report.f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    unknown = DetectionReport.measure(flagged, [None] * 8)
    assert unknown.precision is None and unknown.num_flagged == 4
    nothing = DetectionReport.measure(np.zeros(8, bool), noisy)
    assert nothing.precision is None and nothing.recall == 0.0 and nothing.f1 is None


def labelled(n: int = 200, k: int = 4, seed: int = 0) -> tuple[Dataset, np.ndarray]:
    labels, probs = random_probs(n, k, seed)
    data = Dataset.from_dict({"x": list(range(n)), "label": labels.tolist()})
    noisy, _ = add_label_noise(data, "symmetric", 0.3, seed=seed, num_classes=k)
    return noisy, probs


def test_remove_drops_the_flagged_samples_and_keeps_their_index():
    data, probs = labelled()
    config = CleaningConfig()
    flagged = find_label_issues(data["label"], probs, config=config)
    cleaned, report = clean_dataset(data, probs, config)
    assert cleaned["index"] == np.flatnonzero(~flagged).tolist() and cleaned["x"] == cleaned["index"]
    kept = np.asarray(data["label"])[~flagged]
    assert report.remaining_per_class == np.bincount(kept, minlength=4).tolist()
    assert report.detection == DetectionReport.measure(flagged, data["is_noisy"])
    assert report.relabelled_correct is None


def test_relabel_takes_the_mentor_class_and_updates_is_noisy():
    data, probs = labelled(seed=2)
    config = CleaningConfig(action="relabel")
    flagged = find_label_issues(data["label"], probs, config=config)
    cleaned, report = clean_dataset(data, probs, config)
    assert len(cleaned) == len(data) and cleaned.column_names == data.column_names
    expected = np.where(flagged, probs.argmax(axis=1), np.asarray(data["label"]))
    assert np.array_equal(np.asarray(cleaned["label"]), expected)
    assert np.array_equal(np.asarray(cleaned["is_noisy"]), expected != np.asarray(cleaned["clean_label"]))
    assert report.relabelled_correct == int((expected[flagged] == np.asarray(data["clean_label"])[flagged]).sum())
    assert sum(report.remaining_per_class) == len(data)


def test_save_cleanlab_inputs_round_trip(tmp_path):
    labels, probs = random_probs()
    save_cleanlab_inputs(tmp_path / "issues.npz", labels, probs, indices=np.arange(200) + 5)
    stored = np.load(tmp_path / "issues.npz")
    assert np.array_equal(stored["labels"], labels) and np.array_equal(stored["pred_probs"], probs)
    assert stored["index"][0] == 5


def test_cleanlab_agrees_on_what_the_export_holds(tmp_path):
    cleanlab_filter = pytest.importorskip("cleanlab.filter")
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    features, clean = load_digits(return_X_y=True)
    data, noise = add_label_noise(
        Dataset.from_dict({"label": clean.tolist()}), "symmetric", 0.2, seed=0, num_classes=10
    )
    labels = np.asarray(data["label"])
    probs = cross_val_predict(LogisticRegression(max_iter=2000), features / 16.0, labels, cv=5, method="predict_proba")
    save_cleanlab_inputs(tmp_path / "issues.npz", labels, probs)
    stored = np.load(tmp_path / "issues.npz")
    theirs = cleanlab_filter.find_label_issues(labels=stored["labels"], pred_probs=stored["pred_probs"])
    ours = find_label_issues(labels, probs, config=CleaningConfig())
    for flagged in (theirs, ours):  # both find most of the noise (measured: P 0.88 / 0.71, R 0.92 / 0.99)
        report = DetectionReport.measure(flagged, noise.is_noisy)
        assert report.precision > 0.65 and report.recall > 0.85
    # Confident learning flags a subset of the disagreements (all of them here).
    assert (theirs & ours).sum() >= 0.95 * theirs.sum()


def test_cleanlabs_datalab_takes_the_neighbour_vote_as_it_is_saved(tmp_path):
    """What a run writes for cleanlab (``save_cleanlab_inputs``: the vote of `detect_label_noise`, or a mentor's
    probabilities) goes into ``Datalab.find_issues(pred_probs=..., features=...)`` unchanged, and finds the noise."""
    datalab = pytest.importorskip("cleanlab.datalab.datalab")
    from sklearn.datasets import load_digits

    from noisy_meta import detect_label_noise

    features, clean = load_digits(return_X_y=True)
    data, noise = add_label_noise(
        Dataset.from_dict({"label": clean.tolist()}), "symmetric", 0.2, seed=0, num_classes=10
    )
    labels = np.asarray(data["label"])
    vote = detect_label_noise(features / 16.0, labels, num_classes=10, k=10)
    save_cleanlab_inputs(tmp_path / "vote.npz", labels, vote.pred_probs, indices=np.arange(len(labels)))
    stored = np.load(tmp_path / "vote.npz")
    lab = datalab.Datalab(data={"label": stored["labels"]}, label_name="label", verbosity=0)
    lab.find_issues(pred_probs=stored["pred_probs"], features=features / 16.0, issue_types={"label": {}})
    flagged = lab.get_issues("label")["is_label_issue"].to_numpy()
    report = DetectionReport.measure(flagged, noise.is_noisy)
    assert report.precision > 0.9 and report.recall > 0.85  # measured: 0.98 and 0.94


class Probe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(3)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(self.norm(x))


def test_predict_probabilities_runs_in_eval_mode_and_restores_the_mode():
    torch.manual_seed(0)
    model = Probe().train()
    before = model.norm.running_mean.clone()
    x = torch.randn(10, 3)
    probs = predict_probabilities(model, x.split(4))
    assert model.training and torch.equal(model.norm.running_mean, before)
    with torch.no_grad():
        expected = torch.softmax(model.eval()(x), dim=1).double().numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_iterations_start_from_the_previous_mentor_and_judge_the_original_data():
    data, probs = labelled()
    calls = []

    def train(train_set, iteration, mentor):
        calls.append((len(train_set), iteration, mentor))
        return f"mentor{iteration}"

    judged = []

    def predict(mentor, dataset):
        judged.append((mentor, len(dataset)))
        return probs

    reports = iterate_with_cleaning(data, 3, train, predict, CleaningConfig())
    kept = int((~find_label_issues(data["label"], probs, config=CleaningConfig())).sum())
    assert calls == [(200, 0, None), (kept, 1, "mentor0"), (kept, 2, "mentor1")]
    assert judged == [("mentor0", 200), ("mentor1", 200)] and len(reports) == 2


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: CleaningConfig(criterion="loss"), "criterion must be one of"),
        (lambda: CleaningConfig(threshold=1.0), r"in \[0, 1\) for 'confident_disagreement'"),
        (lambda: CleaningConfig("given_label_prob", 0.0), r"in \(0, 1\] for 'given_label_prob'"),
        (lambda: CleaningConfig(action="drop"), "action must be one of"),
        (lambda: find_label_issues([0, 1], np.full((2, 2), 0.7)), "summing to 1"),
        (lambda: find_label_issues([0, 2], np.full((2, 2), 0.5)), r"labels must lie in \[0, 2\)"),
        (lambda: find_label_issues([0, 1, 1], np.full((2, 2), 0.5)), r"\[N, K\] with N = 3"),
        (
            lambda: clean_dataset(Dataset.from_dict({"label": [0, 1]}), np.full((2, 2), 0.5), CleaningConfig()),
            "lacks the label columns",
        ),
        (
            lambda: iterate_with_cleaning(labelled()[0], 0, None, None, CleaningConfig()),
            "iterations must be an integer >= 1",
        ),
        (
            lambda: iterate_with_cleaning(
                *labelled()[:1], 2, lambda d, i, m: m, lambda m, d: _all_wrong(d), CleaningConfig()
            ),
            "removed every sample",
        ),
    ],
)
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _all_wrong(dataset: Dataset) -> np.ndarray:
    labels = np.asarray(dataset["label"])
    probs = np.zeros((len(labels), 4))
    probs[np.arange(len(labels)), (labels + 1) % 4] = 1.0
    return probs


def test_mask_keeps_every_row_and_marks_the_flagged_labels():
    from datasets import Dataset

    from noisy_meta.labels.cleaning import LABEL_KEPT, apply_flags

    data = Dataset.from_dict(
        {"label": [0, 1, 2, 1], "clean_label": [0, 1, 1, 1], "is_noisy": [False, False, True, False]}
    )
    flagged = np.array([False, False, True, True])
    masked, per_class, relabelled = apply_flags(data, flagged, np.array([0, 1, 1, 1]), "mask", 3)
    assert masked["label"] == data["label"] and masked[LABEL_KEPT] == [True, True, False, False]
    assert per_class == [1, 1, 0] and relabelled is None
