"""The fine-tuning benchmark's data: digits in a source and a target rendering, with seeded label noise.

The source task (pretraining, clean labels): digits 0-4 from the embedded MNIST-5k and
scikit-learn's 8x8 digits, at 16x16. The target task: digits 5-9 from both, downsampled to 8x8
and back (blurred) and inverted; 800 clean test images, 1,000 noisy validation images, the rest
for training, each `SETTINGS` noise drawn with the run's seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from noisy_meta.finetune.data import embedded_mnist
from noisy_meta.labels.noise import confusion_labels, inject_noise, open_set_noise

IMG = 16
SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
NUM_TEST = 800
#: Noisy validation images: enough to tell settings 2 points apart (sampling sd ~1.2 points at 80%)
NUM_VAL = 1000
#: What the pretraining cache's key says about the data (MNIST-5k and scikit-learn's digits).
DATA_VERSION = "mnist5k+sklearn-digits"

#: setting -> (noise kind, rate)
SETTINGS: dict[str, tuple[str, float]] = {
    "sym40": ("symmetric", 0.4),
    "pair40": ("pairflip", 0.4),
    "inst40": ("confusion", 0.4),
    "open30": ("open_set", 0.3),
    "clean": ("none", 0.0),
}


# ------------------------------------------------------------------------------------ data


def render_source(pixels: torch.Tensor) -> torch.Tensor:
    """Digits in [0, 1] at their own size -> 16x16, light strokes on black (the pretraining rendering)."""
    mode = "area" if pixels.shape[-1] > IMG else "bilinear"
    return F.interpolate(pixels, size=(IMG, IMG), mode=mode, **({} if mode == "area" else {"align_corners": False}))


def render_target(pixels: torch.Tensor) -> torch.Tensor:
    """The target rendering: 8x8 and back to 16x16 (blurred), inverted (dark strokes on white)."""
    small = F.interpolate(pixels, size=(8, 8), mode="area") if pixels.shape[-1] != 8 else pixels
    return 1.0 - F.interpolate(small, size=(IMG, IMG), mode="bilinear", align_corners=False)


def standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std()


@lru_cache(maxsize=1)
def digits() -> tuple[list[torch.Tensor], np.ndarray]:
    """Every embedded digit: MNIST-5k (28x28) and scikit-learn's 1,797 (8x8), pixels in [0, 1], and labels."""
    from sklearn.datasets import load_digits

    data = embedded_mnist()
    images = [np.asarray(img, dtype=np.uint8) for split in ("train", "test") for img in data[split]["image"]]
    labels = [label for split in ("train", "test") for label in data[split]["label"]]
    mnist_pixels = torch.tensor(np.stack(images), dtype=torch.float32)[:, None] / 255.0
    small = load_digits()
    small_pixels = torch.tensor(small.images, dtype=torch.float32)[:, None] / 16.0
    pixels = [mnist_pixels, small_pixels]
    return pixels, np.concatenate([np.asarray(labels, dtype=np.int64), small.target.astype(np.int64)])


@lru_cache(maxsize=2)
def rendered(kind: str) -> torch.Tensor:
    """All digits in the source or the target rendering, standardised, ``[N, 1, 16, 16]``."""
    render = render_source if kind == "source" else render_target
    return standardise(torch.cat([render(part) for part in digits()[0]]))


@dataclass
class Target:
    train_x: torch.Tensor
    train_y: torch.Tensor  # noisy
    train_clean: torch.Tensor  # true labels; OUTSIDE for open-set images
    val_x: torch.Tensor
    val_y: torch.Tensor  # noisy
    test_x: torch.Tensor
    test_y: torch.Tensor  # clean
    realised_rate: float


@cache
def target(setting: str, seed: int) -> Target:
    """The target task with the setting's noise (seeded); test split fixed across seeds."""
    _, labels = digits()
    x = rendered("target")
    inside = np.flatnonzero(np.isin(labels, TARGET_CLASSES))
    order = np.random.default_rng(1234).permutation(inside)
    test, rest = order[:NUM_TEST], order[NUM_TEST:]
    y = labels - TARGET_CLASSES[0]  # 5-9 -> 0-4; 0-4 -> negative (the open-set pool)
    kind, rate = SETTINGS[setting]
    rng = np.random.default_rng(seed)
    if kind == "open_set":
        pool = np.flatnonzero(np.isin(labels, SOURCE_CLASSES))
        rows = np.concatenate([rest, pool])
        noise = open_set_noise(labels[rows], 10, SOURCE_CLASSES, rate, seed)
        rows, noisy, clean, realised = rows[noise.rows], noise.labels, noise.clean_labels, noise.realised_rate
    else:
        rows = rest
        clean = y[rows]
        if kind == "confusion":
            noisy = confusion_labels(clean, held_out_probabilities(x[rows], clean, seed), rate, seed)
        else:
            noisy = inject_noise(clean, len(TARGET_CLASSES), kind, rate, seed).labels
        realised = float(np.mean(noisy != clean))
    shuffled = rng.permutation(len(rows))
    val, train = shuffled[:NUM_VAL], shuffled[NUM_VAL:]
    noisy, clean = torch.tensor(noisy), torch.tensor(clean)
    return Target(
        x[rows[train]], noisy[train], clean[train], x[rows[val]], noisy[val], x[test], torch.tensor(y[test]), realised
    )


def held_out_probabilities(images: torch.Tensor, labels: np.ndarray, seed: int) -> np.ndarray:
    """A pixel-space logistic regression's 5-fold held-out class probabilities (its own confusions)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    features = images.flatten(1).numpy()
    model = LogisticRegression(max_iter=300, C=0.05)
    return cross_val_predict(model, features, labels, cv=5, method="predict_proba")
