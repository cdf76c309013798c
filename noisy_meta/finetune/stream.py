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
number of updates. With ``--workers N`` the stream is read with its images undecoded and N
loader processes decode and transform each batch (`DecodingPool`), a few batches ahead; the
reading, the shuffle buffer and the position stay in the main process, so batches come out in
the same order with the same crops as without workers, and resume the same way.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch
from datasets import Image, IterableDataset, load_dataset, load_from_disk
from datasets.distributed import split_dataset_by_node

from .data import CLEAN_COLUMN, SeededAugmentation, collate, is_saved_to_disk, parquet_files_by_split

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
