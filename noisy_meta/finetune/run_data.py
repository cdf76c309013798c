"""The data of a fine-tuning run: the splits loaded, checked and noised, or the training stream opened.

`load_splits` reads ``--dataset`` (`noisy_meta.finetune.data`), scans the splits used for
images that do not decode (``--bad-images``), injects ``--noise`` into the training split and
carves a validation split where there is none; with ``--streaming`` it opens this rank's
training stream (`noisy_meta.finetune.stream`) and loads only validation and test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from datasets import DatasetDict
from rich.console import Console

from ..labels.noise import OPEN_SET
from ..labels.noisy_datasets import LABEL
from .data import Splits, drop_bad_images, find_bad_images, load_eval_splits, load_image_dataset, prepare_splits
from .names import BAD_IMAGES_FILE
from .stream import open_stream

__all__ = ["load_splits"]


def load_splits(args: argparse.Namespace, console: Console, accelerator: Accelerator) -> Splits:
    if args.streaming:
        return _stream_splits(args, console, accelerator)
    noise, noise_rate = args.noise, args.noise_rate
    data = load_image_dataset(args.dataset)
    test_split = _test_split(args, data)
    names = [s for s in (args.train_split, args.val_split, test_split) if s in data]
    data = _handle_bad_images(args, console, data, names, accelerator.is_main_process)
    splits = prepare_splits(
        data,
        train_split=args.train_split,
        val_split=args.val_split,
        test_split=test_split,
        image_column=args.image_column,
        label_column=args.label_column,
        clean_label_column=args.clean_label_column,
        num_classes=args.num_classes,
        noise=noise,
        noise_rate=noise_rate,
        val_fraction=args.val_fraction,
        seed=args.seed,
        open_set_classes=tuple(args.open_set_classes or ()),
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
            f"label noise: {noise}, rate {noise_rate:.2f} requested, {splits.noise.realised_rate:.4f} realised"
            + (f"; classes {sorted(args.open_set_classes)} left the label space" if noise == OPEN_SET else "")
        )
    console.print(
        f"train {len(splits.train)}, validation {len(splits.validation)} (scored against "
        f"{'clean' if splits.validation_is_clean else 'the given'} labels), "
        f"test {len(splits.test) if splits.test is not None else 0}; {splits.num_classes} classes"
    )
    return splits


def _stream_splits(args: argparse.Namespace, console: Console, accelerator: Accelerator) -> Splits:
    """``--streaming``: this rank's training stream; validation and test loaded whole (they are small).

    Labels are taken as given (the flag checks refused noise injection); the number of
    classes comes from ``--num-classes``, or the stream's class-label feature.
    """
    stream, rows, shards = open_stream(
        args.dataset, args.train_split, accelerator.process_index, accelerator.num_processes
    )
    for column in filter(None, (args.image_column, args.label_column, args.clean_label_column)):
        if stream.features is not None and column not in stream.features:
            raise ValueError(f"column {column!r} not in the training stream; it has {list(stream.features)}")
    feature = stream.features[args.label_column] if stream.features is not None else None
    num_classes = args.num_classes or getattr(feature, "num_classes", None)
    if num_classes is None:
        raise ValueError(
            "--streaming: the label column is not a class label, and a stream cannot be scanned for its range: "
            "pass --num-classes"
        )
    data = load_eval_splits(args.dataset, args.train_split)
    if args.val_split not in data:
        raise ValueError(f"--val-split {args.val_split!r} not in {args.dataset}; it has {sorted(data)}")
    test_split = _test_split(args, data)
    names = [s for s in (args.val_split, test_split) if s in data]
    data = _handle_bad_images(args, console, data, names, accelerator.is_main_process)
    evaluation = prepare_splits(
        data,
        train_split=args.val_split,  # the evaluation splits' columns are resolved as a training split's would be
        val_split=args.val_split,
        test_split=test_split,
        image_column=args.image_column,
        label_column=args.label_column,
        clean_label_column=args.clean_label_column,
        num_classes=num_classes,
        noise="none",
        noise_rate=0.0,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    own = shards % accelerator.num_processes == 0
    sharing = "each process its own" if own else "every process reads all, keeps every n-th image"
    console.print(
        f"train: a stream of {rows} images in {shards} shards ({sharing}), shuffle buffer {args.shuffle_buffer}; "
        f"validation {len(evaluation.validation)}, test {len(evaluation.test) if evaluation.test is not None else 0}; "
        f"{num_classes} classes"
    )
    return dataclasses.replace(evaluation, train=stream, train_rows=rows)


def _test_split(args: argparse.Namespace, data: DatasetDict) -> str | None:
    """``--test-split``: ``auto`` is ``test`` when the data set has one, ``none`` none."""
    return {"auto": "test" if "test" in data else None, "none": None}.get(args.test_split, args.test_split)


def _handle_bad_images(
    args: argparse.Namespace, console: Console, data: DatasetDict, names: list[str], main_process: bool
) -> DatasetDict:
    """Scan the splits used for images that do not decode; refuse them, or drop them counted and listed.

    Runs on the data as loaded, before noise injection (instance noise decodes every image).
    """
    if args.bad_images == "unchecked":
        return data
    bad = [b for name in names for b in find_bad_images(data[name], name, args.image_column)]
    if not bad:
        return data
    listing = "; ".join(f"{b.split} sample {b.index} ({b.path or 'in memory'}): {b.error}" for b in bad[:5])
    if args.bad_images == "refuse":
        raise ValueError(
            f"{len(bad)} image(s) do not decode: {listing}{' ...' if len(bad) > 5 else ''}. Fix or remove the "
            "files, or pass --bad-images skip to train without them (they are counted and listed)"
        )
    output_dir = Path(args.output_dir)
    if main_process:
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
