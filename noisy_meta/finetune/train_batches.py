"""The training split's batches behind one interface, whether held in memory or streamed.

`TrainBatches` is what the epoch loop reads: the split's size, the batches of an epoch from
any batch on (a resumed run skips those done), and the epoch that seeds the order. Two
kinds: `ShuffledBatches` (a data set in memory, shuffled by Accelerate's seedable sampler
and split over ranks by it) and `noisy_meta.finetune.stream.StreamLoader` (``--streaming``:
each rank reads its own shards). `train_batches` chooses by the settings, in one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader

from .data import SeededAugmentation, Splits, attach_transform, collate
from .settings import RunContext
from .stream import StreamLoader


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
