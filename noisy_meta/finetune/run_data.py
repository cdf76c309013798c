"""The data of a fine-tuning run: the splits loaded, checked and noised, or the training stream opened.

`load_splits` reads ``--dataset`` (`noisy_meta.finetune.data`), scans the splits used for
images that do not decode (``--bad-images``), injects ``--noise`` into the training split and
carves a validation split where there is none; with ``--streaming`` it opens this rank's
training stream (`noisy_meta.finetune.stream`) and loads only validation and test.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from accelerate.utils import broadcast_object_list
from datasets import DatasetDict

from ..labels.noise import OPEN_SET
from ..labels.noisy_datasets import LABEL
from .data import Splits, drop_bad_images, find_bad_images, load_eval_splits, load_image_dataset, prepare_splits
from .names import BAD_IMAGES_FILE
from .settings import RunContext, RunSettings
from .stream import open_stream

__all__ = ["load_splits"]


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
