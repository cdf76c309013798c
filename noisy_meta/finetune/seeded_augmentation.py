"""Random augmentation drawn from a seed per image: the same crops after a resume and with any worker count.

Accelerate's data loader fetches one batch ahead, so when a run checkpoints after an update
the next batch's random crops have already been drawn from the global RNG; a run resumed
there would draw them again from a later state. Drawing each image's augmentation from a seed
of its own, made of the run's seed, the epoch and the image's index, removes that coupling:
the augmentations are the same whether the run was interrupted or not, and whatever
``--workers`` is (worker processes no longer get their own streams).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


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
