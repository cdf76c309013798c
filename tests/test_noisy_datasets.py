"""Label noise on datasets: the standard columns, the statistics, real noisy data sets, errors."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image, Value

from noisy_meta.labels.noise import OUTSIDE, inject_noise
from noisy_meta.labels.noisy_datasets import (
    add_label_noise,
    add_open_set_noise,
    image_features,
    num_classes_of,
    restrict_to_classes,
    with_label_columns,
)


def digits(n: int = 300, mode: str = "L") -> Dataset:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (8, 8, 3) if mode == "RGB" else (8, 8), dtype=np.uint8) for _ in range(n)]
    labels = (np.arange(n) % 10).tolist()
    features = Features(
        {"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)]), "source": Value("string")}
    )
    return Dataset.from_dict({"image": images, "label": labels, "source": ["web"] * n}, features=features)


@pytest.mark.parametrize("kind", ["symmetric", "pairflip", "instance"])
def test_add_label_noise_gives_the_standard_columns(kind):
    data = digits()
    noisy, noise = add_label_noise(data, kind, 0.4, seed=3)
    assert {"image", "label", "clean_label", "is_noisy", "index", "source"} <= set(noisy.column_names)
    labels, clean = np.asarray(noisy["label"]), np.asarray(noisy["clean_label"])
    assert np.array_equal(clean, np.asarray(data["label"]))  # the given labels are the truth
    assert np.array_equal(labels, noise.labels) and np.array_equal(np.asarray(noisy["is_noisy"]), labels != clean)
    assert noisy["index"] == list(range(len(data))) and noisy["source"] == data["source"]
    assert noise.realised_rate == pytest.approx(np.mean(labels != clean)) and noise.realised_rate > 0.2
    again, _ = add_label_noise(data, kind, 0.4, seed=3)
    assert again["label"] == noisy["label"]


def test_add_label_noise_matches_inject_noise_on_the_labels():
    data = digits()
    noisy, _ = add_label_noise(data, "symmetric", 0.5, seed=9, include_true_class=True)
    expected = inject_noise(np.asarray(data["label"]), 10, "symmetric", 0.5, 9, include_true_class=True)
    assert np.array_equal(np.asarray(noisy["label"]), expected.labels)


def test_instance_noise_uses_the_images_or_given_features():
    data = digits(mode="RGB")
    features = image_features(data)
    assert features.shape == (len(data), 3 * 16 * 16) and abs(features.mean()) < 1e-5
    from_images, _ = add_label_noise(data, "instance", 0.4, seed=1)
    given, _ = add_label_noise(data, "instance", 0.4, seed=1, features=features)
    assert from_images["label"] == given["label"]
    grey = image_features(digits(mode="L"))  # grey and colour images give the same length
    assert grey.shape == features.shape


def test_real_noisy_data_sets_are_used_as_they_come():
    data = digits().map(lambda row: {"worse_label": (row["label"] + 1) % 10 if row["label"] < 3 else row["label"]})
    standard = with_label_columns(data, label_column="worse_label", clean_label_column="label")
    assert np.array_equal(np.asarray(standard["label"]), np.asarray(data["worse_label"]))
    assert np.array_equal(np.asarray(standard["clean_label"]), np.asarray(data["label"]))
    assert np.array_equal(np.asarray(standard["is_noisy"]), np.asarray(data["label"]) < 3)
    unknown = with_label_columns(data, label_column="worse_label")
    assert set(unknown["clean_label"]) == {-1} and set(unknown["is_noisy"]) == {None}


def test_num_classes_from_class_label_or_values():
    assert num_classes_of(digits(20)) == 10
    plain = Dataset.from_dict({"label": [0, 4, 2]})
    assert num_classes_of(plain) == 5


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda d: add_label_noise(add_label_noise(d, "symmetric", 0.2, 0)[0], "symmetric", 0.2, 0),
            "already has a 'clean_label'",
        ),
        (lambda d: add_label_noise(d, "symmetric", 0.2, 0, label_column="target"), "column 'target' not in"),
        (
            lambda d: add_label_noise(d, "symmetric", 0.2, 0, num_classes=5),
            r"label 5 of sample 5 in column 'label' is outside \[0, 5\)",
        ),
        (lambda d: add_label_noise(d, "instance", 0.2, 0, image_column="picture"), "column 'picture' not in"),
        (
            lambda d: with_label_columns(d.add_column("bad", [0.5] * len(d)), label_column="bad"),
            "integer class indices",
        ),
        (
            lambda d: with_label_columns(d.add_column("gap", [None] + [1] * (len(d) - 1)), label_column="gap"),
            "no label for sample 0",
        ),
    ],
)
def test_errors_name_the_column_and_sample(call, message):
    with pytest.raises(ValueError, match=message):
        call(digits(30))


def test_open_set_noise_on_a_data_set_marks_outside_images():
    data = digits(300)  # 30 per class
    noisy, noise = add_open_set_noise(data, [8, 9], 0.25, seed=0)
    assert len(noisy) == 240 and noise.num_classes == 8
    clean, labels = np.asarray(noisy["clean_label"]), np.asarray(noisy["label"])
    outside = clean == OUTSIDE
    assert outside.sum() == 60 and labels.min() >= 0 and labels.max() < 8
    assert [bool(v) for v in np.asarray(noisy["is_noisy"])[outside]] == [True] * 60
    assert np.array_equal(labels[~outside], clean[~outside]) and not any(np.asarray(noisy["is_noisy"])[~outside])
    assert noisy["source"] == ["web"] * 240  # other columns kept
    assert noisy["index"] == list(range(240))


def test_restrict_to_classes_drops_and_renumbers_like_the_noise():
    restricted = restrict_to_classes(digits(100), [0, 5])
    assert len(restricted) == 80
    assert restricted.features["label"].names == ["1", "2", "3", "4", "6", "7", "8", "9"]
    original = [d for d in np.arange(100) % 10 if d not in (0, 5)]
    mapping = {1: 0, 2: 1, 3: 2, 4: 3, 6: 4, 7: 5, 8: 6, 9: 7}
    assert restricted["label"] == [mapping[d] for d in original]
