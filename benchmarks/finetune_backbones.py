"""The fine-tuning benchmark's backbones: a timm ResNet and a small ViT, pretrained on the source task and
cached, and the plain training loop (SGD or AdamW, cosine, timm's ModelEmaV3 alongside) the baselines use."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from finetune_data import DATA_VERSION, IMG, SOURCE_CLASSES, digits, rendered
from safetensors.torch import load_file, save_file
from timm.utils import ModelEmaV3
from torch import nn

from noisy_meta.losses import resolve_criterion

#: timm's ModelEmaV3 decay beside the plain loop (warm-up on)
EMA_DECAY = 0.99

#: architecture -> timm model name and constructor arguments
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet": ("test_resnet", {}),
    "vit": ("vit_tiny_patch16_224", {"img_size": IMG, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}),
}


# ------------------------------------------------------------------------------------ pretraining


def make_model(arch: str, num_classes: int) -> nn.Module:
    name, kwargs = ARCHS[arch]
    return timm.create_model(name, num_classes=num_classes, in_chans=1, **kwargs)


#: architecture -> pretraining recipe (a ViT learns slowly from 2,000 images: AdamW, more epochs)
PRETRAIN: dict[str, dict[str, Any]] = {
    "resnet": {"opt": "sgd", "epochs": 15, "lr": 0.05, "batch_size": 64, "seed": 0},
    "vit": {"opt": "adamw", "epochs": 100, "lr": 2e-3, "batch_size": 64, "seed": 0},
}


def pretrained_path(arch: str, recipe: dict[str, Any], cache: Path) -> Path:
    made = json.dumps([ARCHS[arch], recipe, SOURCE_CLASSES, IMG, DATA_VERSION], sort_keys=True)
    return cache / f"{arch}-{hashlib.sha256(made.encode()).hexdigest()[:10]}.safetensors"


def pretrain(arch: str, recipe: dict[str, Any], cache: Path) -> Path:
    """Pretrain ``arch`` on the source task with clean labels (cached); prints how and how long."""
    path = pretrained_path(arch, recipe, cache)
    if path.exists():
        print(f"pretrained {arch}: cached {path} ({json.loads(path.with_suffix('.json').read_text())})", flush=True)
        return path
    started = time.perf_counter()
    torch.manual_seed(recipe["seed"])
    _, labels = digits()
    rows = np.flatnonzero(np.isin(labels, SOURCE_CLASSES))
    order = np.random.default_rng(recipe["seed"]).permutation(rows)
    held, used = order[:500], order[500:]
    x, y = rendered("source"), torch.tensor(labels)
    model = make_model(arch, len(SOURCE_CLASSES))
    updates = recipe["epochs"] * (len(used) // recipe["batch_size"])
    loop = PlainLoop(model, recipe["lr"], updates, "cross_entropy", opt=recipe["opt"])
    generator = torch.Generator().manual_seed(recipe["seed"])
    for _ in range(recipe["epochs"]):
        for batch in batches(len(used), recipe["batch_size"], generator):
            images_batch = x[used[batch]]
            shift = torch.randint(-2, 3, (2,), generator=generator).tolist()  # light augmentation
            loop.step(torch.roll(images_batch, shifts=shift, dims=(2, 3)), y[used[batch]])
    accuracy = evaluate(model, x[held], y[held])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    seconds = time.perf_counter() - started
    print(
        f"pretrained {arch} ({ARCHS[arch][0]}): MNIST digits {SOURCE_CLASSES} at {IMG}x{IMG}, {len(used)} images, "
        f"clean labels, {recipe['epochs']} epochs {recipe['opt']} lr {recipe['lr']} cosine, +-2 px shifts; "
        f"held-out source accuracy {100 * accuracy:.1f}%; {seconds:.0f} s -> {path}",
        flush=True,
    )
    (path.with_suffix(".json")).write_text(
        json.dumps({"recipe": recipe, "source_accuracy": accuracy, "seconds": seconds}, indent=1) + "\n"
    )
    return path


def pretraining_note(arch: str, path: Path) -> str:
    made = json.loads(path.with_suffix(".json").read_text())
    recipe = made["recipe"]
    name, kwargs = ARCHS[arch]
    return (
        f"`{name}`{' ' + str(kwargs) if kwargs else ''}, {recipe['epochs']} epochs {recipe['opt']} lr {recipe['lr']}, "
        f"held-out source accuracy {100 * made['source_accuracy']:.1f}%, {made['seconds']:.0f} s"
    )


def load_pretrained(path: Path, arch: str, num_classes: int) -> nn.Module:
    """The cached backbone with a new, randomly initialised classifier for the target."""
    model = make_model(arch, len(SOURCE_CLASSES))
    model.load_state_dict(load_file(str(path)))
    model.reset_classifier(num_classes)
    return model


# ------------------------------------------------------------------------------------ training


def batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


class PlainLoop:
    """SGD + cosine schedule with one of the baseline losses, and timm's ModelEmaV3 alongside."""

    def __init__(
        self, model: nn.Module, lr: float, total: int, loss: str, opt: str = "sgd", clip: float | None = None
    ) -> None:
        self.model = model
        #: the gradient's global norm is clipped to this (None: not clipped)
        self.clip = clip
        if opt == "adamw":
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
        else:
            self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        self.scheduler = cosine(self.optimizer, total)
        self.loss = resolve_criterion(loss)
        self.ema = ModelEmaV3(model, decay=EMA_DECAY, use_warmup=True)
        self.updates = 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = self.loss(self.model(x), y)
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.updates += 1
        self.ema.update(self.model, step=self.updates)


def cosine(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    hits = sum(int((model(part).argmax(1) == target).sum()) for part, target in zip(x.split(500), y.split(500)))
    model.train(was_training)
    return hits / len(y)
