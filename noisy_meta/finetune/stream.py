"""Training images read as a stream (``--streaming``): web-scale data that is never loaded whole.

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
number of updates. Images are decoded and transformed in the main process (no loader workers).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch
from datasets import IterableDataset, load_dataset, load_from_disk
from datasets.distributed import split_dataset_by_node

from .data import CLEAN_COLUMN, collate, is_saved_to_disk, parquet_files_by_split
from .seeded_augmentation import SeededAugmentation

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
    ) -> None:
        self.stream, self.rows, self.augmentation = stream, rows, augmentation
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
        stream = self.stream.shuffle(seed=self.seed, buffer_size=self.buffer_size)
        stream.set_epoch(self.epoch)
        position = done * self.batch_size
        examples = iter(stream.skip(position) if position else stream)
        while True:
            chunk = list(islice(examples, self.batch_size))
            if not self._every_rank_has_a_batch(len(chunk) == self.batch_size):
                return
            samples = [self._sample(example, position + offset) for offset, example in enumerate(chunk)]
            position += self.batch_size
            yield {key: value.to(self.accelerator.device) for key, value in collate(samples).items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.batches()

    def _sample(self, example: dict[str, Any], position: int) -> dict[str, Any]:
        image_column, label_column, clean_column = self.columns
        # A seed per image: its position in this rank's epoch, made unique over ranks.
        index = position * self.accelerator.num_processes + self.accelerator.process_index
        return {
            "pixel_values": self.augmentation(example[image_column].convert("RGB"), index),
            "label": int(example[label_column]),
            CLEAN_COLUMN: int(example[clean_column]) if clean_column else -1,
            "index": index,
        }

    def _every_rank_has_a_batch(self, local: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return local
        flag = torch.tensor([int(local)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() == self.accelerator.num_processes)
