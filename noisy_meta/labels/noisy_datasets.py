"""Noisy labels on Hugging Face `datasets`: inject synthetic noise, or take a real noisy data set as it comes.

Both give a split the same label columns, so training, evaluation and data cleaning read
them the same way:

- ``label``: the label trained on (noisy);
- ``clean_label``: the true label, -1 where it is unknown, or `OUTSIDE` (-2) for an image of
  no class of the label space (open-set noise);
- ``is_noisy``: ``label != clean_label`` (True for an outside image), or None where the clean
  label is unknown;
- ``index``: the sample's position in the split, to join per-sample results back.

Other columns (images, extra label columns) are kept as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from datasets import ClassLabel, Dataset, Value

from .noise import OUTSIDE, NoisyLabels, OpenSetNoise, class_map_without, inject_noise, open_set_noise

LABEL = "label"
CLEAN_LABEL = "clean_label"
IS_NOISY = "is_noisy"
INDEX = "index"
LABEL_COLUMNS = (LABEL, CLEAN_LABEL, IS_NOISY, INDEX)


def add_label_noise(
    dataset: Dataset,
    kind: str,
    rate: float,
    seed: int,
    *,
    label_column: str = LABEL,
    num_classes: int | None = None,
    include_true_class: bool = False,
    class_map: Mapping[int, int] | None = None,
    image_column: str = "image",
    features: np.ndarray | None = None,
) -> tuple[Dataset, NoisyLabels]:
    """Corrupt the labels of ``dataset``; returns the data set with the label columns and the noise made.

    The labels in ``label_column`` are taken as true (they become ``clean_label``). ``kind``,
    ``rate``, ``include_true_class`` and ``class_map`` are `noisy_meta.inject_noise`'s. For
    ``kind="instance"`` the noise depends on each sample: on ``features`` (``[N, d]``) when
    given, else on the images in ``image_column`` (see `image_features`). The returned
    `NoisyLabels` holds the realised rate and the transition matrix.
    """
    if CLEAN_LABEL in dataset.column_names:
        raise ValueError(
            f"the data set already has a {CLEAN_LABEL!r} column: noise was injected already, or it has "
            "clean labels of its own (then use with_label_columns)"
        )
    clean = _checked_labels(dataset, label_column, num_classes)
    num_classes = num_classes if num_classes is not None else num_classes_of(dataset, label_column)
    if kind == "instance" and features is None:
        features = image_features(dataset, image_column)
    noisy = inject_noise(
        clean,
        num_classes,
        kind,
        rate,
        seed,
        include_true_class=include_true_class,
        class_map=class_map,
        features=features if kind == "instance" else None,
    )
    return _set_label_columns(dataset, noisy.labels, noisy.clean_labels), noisy


def add_open_set_noise(
    dataset: Dataset,
    outside_classes,
    rate: float,
    seed: int,
    *,
    label_column: str = LABEL,
    num_classes: int | None = None,
) -> tuple[Dataset, OpenSetNoise]:
    """Open-set noise (`noisy_meta.labels.noise.open_set_noise`): the classes in ``outside_classes``
    leave the label space and a fraction ``rate`` of the remaining images is replaced by theirs,
    each with a random label of the space.

    Returns the new data set (``label`` and ``clean_label`` renumbered by the noise's
    ``class_map``, ``clean_label`` `OUTSIDE` for the outside images) and the `OpenSetNoise`.
    Prepare the validation and test splits with `restrict_to_classes`.
    """
    if CLEAN_LABEL in dataset.column_names:
        raise ValueError(f"the data set already has a {CLEAN_LABEL!r} column: noise was injected already")
    num_classes = num_classes if num_classes is not None else num_classes_of(dataset, label_column)
    clean = _checked_labels(dataset, label_column, num_classes)
    noise = open_set_noise(clean, num_classes, outside_classes, rate, seed)
    return _set_label_columns(dataset.select(noise.rows), noise.labels, noise.clean_labels), noise


def restrict_to_classes(
    dataset: Dataset, outside_classes, *, label_column: str = LABEL, num_classes: int | None = None
) -> Dataset:
    """``dataset`` without the images of ``outside_classes``, labels renumbered as
    `add_open_set_noise` does (for the validation and test splits of an open-set experiment)."""
    num_classes = num_classes if num_classes is not None else num_classes_of(dataset, label_column)
    class_map = class_map_without(num_classes, outside_classes)
    labels = _checked_labels(dataset, label_column, num_classes)
    rows = np.flatnonzero(np.isin(labels, list(class_map)))
    result = dataset.select(rows)
    new_labels = np.asarray([class_map[int(c)] for c in labels[rows]], dtype=np.int64)
    result = result.remove_columns([label_column]).add_column(label_column, new_labels.tolist())
    return result.cast_column(label_column, _label_feature(dataset, label_column, class_map))


def _label_feature(dataset: Dataset, label_column: str, class_map: Mapping[int, int]):
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        return ClassLabel(names=[feature.names[old] for old in class_map])
    return Value("int64")


def with_label_columns(
    dataset: Dataset,
    *,
    label_column: str = LABEL,
    clean_label_column: str | None = None,
    num_classes: int | None = None,
) -> Dataset:
    """``dataset`` with the standard label columns, from its own noisy (and, if known, clean) labels.

    For real noisy-label data sets, e.g. CIFAR-10N: ``label_column="worse_label"``,
    ``clean_label_column="label"``. Labels outside ``[0, num_classes)`` raise a ValueError
    naming the column and the sample.
    """
    labels = _checked_labels(dataset, label_column, num_classes)
    if clean_label_column is None:
        clean = np.full_like(labels, -1)
    else:
        clean = _checked_labels(dataset, clean_label_column, num_classes)
    return _set_label_columns(dataset, labels, clean)


def num_classes_of(dataset: Dataset, label_column: str = LABEL) -> int:
    """Classes of a label column: its `ClassLabel` names when declared, else the largest label + 1."""
    if label_column not in dataset.column_names:
        raise ValueError(f"column {label_column!r} not in the data set; it has {dataset.column_names}")
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        return feature.num_classes
    labels = dataset[label_column]
    return int(max(labels)) + 1 if len(labels) else 0


def image_features(dataset: Dataset, image_column: str = "image", size: int = 16) -> np.ndarray:
    """``[N, 3 * size * size]`` standardised pixels (RGB, resized) of an image column.

    The input instance-dependent noise projects; any size and mode of image gives the same
    length. Standardised with the data set's overall mean and standard deviation.
    """
    if image_column not in dataset.column_names:
        raise ValueError(f"column {image_column!r} not in the data set; it has {dataset.column_names}")
    rows = [
        np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32).reshape(-1)
        for image in dataset[image_column]
    ]
    pixels = np.stack(rows) if rows else np.zeros((0, 3 * size * size), np.float32)
    return (pixels - pixels.mean()) / max(float(pixels.std()), 1e-8)


def _checked_labels(dataset: Dataset, column: str, num_classes: int | None) -> np.ndarray:
    if column not in dataset.column_names:
        raise ValueError(f"column {column!r} not in the data set; it has {dataset.column_names}")
    values = dataset[column]
    if any(value is None for value in values):
        first = next(i for i, value in enumerate(values) if value is None)
        raise ValueError(f"column {column!r} has no label for sample {first}")
    labels = np.asarray(values)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"column {column!r} must hold integer class indices, got {labels.dtype}")
    labels = labels.astype(np.int64)
    limit = num_classes if num_classes is not None else num_classes_of(dataset, column)
    bad = np.flatnonzero((labels < 0) | (labels >= limit))
    if bad.size:
        raise ValueError(
            f"label {labels[bad[0]]} of sample {bad[0]} in column {column!r} is outside [0, {limit}) "
            f"({bad.size} such samples); fix the data or pass the right number of classes"
        )
    return labels


def _set_label_columns(dataset: Dataset, labels: np.ndarray, clean: np.ndarray) -> Dataset:
    known = (clean >= 0) | (clean == OUTSIDE)
    columns = {
        LABEL: (labels.tolist(), Value("int64")),
        CLEAN_LABEL: (clean.tolist(), Value("int64")),
        IS_NOISY: ([bool(noisy) if k else None for noisy, k in zip(labels != clean, known)], Value("bool")),
        INDEX: (list(range(len(labels))), Value("int64")),
    }
    # New columns under temporary names first: a data set left with no column has no rows.
    result = dataset
    for name, (values, feature) in columns.items():
        result = result.add_column(f"__new_{name}", values, feature=feature)
    result = result.remove_columns([name for name in LABEL_COLUMNS if name in dataset.column_names])
    for name in columns:
        result = result.rename_column(f"__new_{name}", name)
    return result
