"""Why an averaged mentor can trail its student, measured (issue: a mentor that is never its initial weights).

The setting of the report: scikit-learn digits (1,400 training images with 50% symmetric
noise, 397 clean for testing, 32 x 32), resnet10t from scratch, SGD with a cosine learning
rate over 440 updates, `MetaNoiseWrapper` with the ramp given (``ramp_start=0, ramp_end=88``)
and the mentor's decays left at the library's long-run values (0.99 while ramping, 0.999
after). For each mentor variant the script trains once (seeded, the same data order) and
reports the clean test accuracy of the student and of the mentor, and of the mentor with its
BatchNorm statistics re-estimated on the training images (`recompute_bn`: are averaged
statistics that no longer match averaged weights the gap?), plus the mentor's share of the
initial weights (the product of the decays).

    python benchmarks/mentor_gap.py --out benchmarks/mentor_gap.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from noisy_meta import MetaNoiseConfig, MetaNoiseWrapper

UPDATES, BATCH = 440, 32
#: Mentor variants: MetaNoiseConfig fields over the report's setting.
VARIANTS = {
    "library decays, no warm-up (before)": {"mentor_warmup": False},
    "library decays, warm-up (now)": {},
    "decay 0.99, no warm-up": {"mentor_warmup": False, "mentor_decay": 0.99},
    "decay 0.99, warm-up": {"mentor_decay": 0.99},
}


def digits(noise_rate: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.target))
    images = torch.tensor(data.images[order], dtype=torch.float32).div(16.0).unsqueeze(1).repeat(1, 3, 1, 1)
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    labels = torch.tensor(data.target[order])
    noisy = labels[:1400].clone()
    flip = torch.tensor(rng.random(1400) < noise_rate)
    noisy[flip] = (noisy[flip] + torch.tensor(rng.integers(1, 10, int(flip.sum())))) % 10
    return images[:1400], noisy, images[1400:], labels[1400:]


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(images).argmax(1) == labels).float().mean())


@torch.no_grad()
def recompute_bn(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """A copy whose BatchNorm statistics are re-estimated (cumulative average) on ``images``."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    for chunk in images.split(128):
        model(chunk)
    return model.eval()


def train(overrides: dict, data: tuple[torch.Tensor, ...], seed: int) -> dict[str, float]:
    train_x, train_y, test_x, test_y = data
    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, UPDATES)
    config = MetaNoiseConfig(ramp_start=0, ramp_end=88, first_order=True, num_synthetic=3, seed=seed, **overrides)
    wrapper = MetaNoiseWrapper(model, optimizer, config)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    while wrapper.num_updates < UPDATES:
        order = torch.randperm(len(train_y), generator=generator)
        for batch in order[: len(order) // BATCH * BATCH].split(BATCH):
            wrapper.step(train_x[batch], train_y[batch])
            scheduler.step()
            if wrapper.num_updates >= UPDATES:
                break
    initial_share = math.prod(config.mentor_decay_at(step) for step in range(UPDATES))
    return {
        "student": accuracy(wrapper.module, test_x, test_y),
        "mentor": accuracy(wrapper.mentor, test_x, test_y),
        "mentor_bn_recomputed": accuracy(recompute_bn(wrapper.mentor, train_x), test_x, test_y),
        "initial_weights_share": initial_share,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--noise-rate", type=float, default=0.5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    data = digits(args.noise_rate)
    results = {}
    for name, overrides in VARIANTS.items():
        runs = [train(overrides, data, seed) for seed in args.seeds]
        results[name] = {key: float(np.mean([run[key] for run in runs])) for key in runs[0]}
        print(name, {k: round(v, 4) for k, v in results[name].items()}, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"seeds": args.seeds, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
