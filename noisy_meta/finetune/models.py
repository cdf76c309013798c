"""The timm models of a fine-tuning run: the student, its transforms, a saved mentor."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import create_transform, resolve_data_config

from .checkpoint import check_body_weights, read_weights
from .settings import ModelSettings, RunSettings


def create_model(settings: ModelSettings, num_classes: int) -> torch.nn.Module:
    """The student: timm's model of that name, from its starting weights, with ``num_classes`` outputs (a PEFT
    LoRA model of it with ``--lora-rank``)."""
    model = _timm_model(settings, num_classes)
    if settings.freeze_backbone:  # a linear probe: only the classifier trains
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    if settings.lora_rank:
        targets = list(settings.lora_targets) if settings.lora_targets else None
        model = add_lora(model, settings.lora_rank, settings.lora_alpha, targets)
    return model


def lora_targets(model: torch.nn.Module) -> list[str]:
    """PEFT ``target_modules`` for a timm model: every ``nn.Linear`` outside the classifier (attention and MLP
    projections of a transformer), or, for a model without one (a CNN), every ungrouped ``nn.Conv2d`` (PEFT cannot
    merge an adapter into a depthwise convolution)."""
    classifier = {id(m) for m in model.get_classifier().modules()} if hasattr(model, "get_classifier") else set()
    for kind in (torch.nn.Linear, torch.nn.Conv2d):
        names = [
            name
            for name, m in model.named_modules()
            if isinstance(m, kind) and id(m) not in classifier and getattr(m, "groups", 1) == 1
        ]
        if names:
            return names
    raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d outside its classifier for LoRA")


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None = None, targets: list[str] | None = None):
    """``model`` as a PEFT LoRA model: rank-``rank`` adapters on ``targets`` (default `lora_targets`), scaled by
    ``alpha / rank`` (default 1, PEFT's default at rank 8), the classifier trained in full; the rest frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("LoRA needs PEFT: pip install 'noisy-meta[peft]'") from error
    classifier = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    if not classifier:
        raise ValueError(f"{type(model).__name__} names no classifier (timm's pretrained_cfg['classifier'])")
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        target_modules=targets or lora_targets(model),
        modules_to_save=[classifier] if isinstance(classifier, str) else list(classifier),
    )
    return get_peft_model(model, config)


def _timm_model(settings: ModelSettings, num_classes: int) -> torch.nn.Module:
    name = settings.name
    if settings.checkpoint is not None:
        if not os.path.isfile(settings.checkpoint):
            raise FileNotFoundError(f"--checkpoint: no file at {settings.checkpoint}")
        path = os.path.abspath(settings.checkpoint)
        check_body_weights(path, timm.create_model(name, num_classes=num_classes), f"--model {name}")
        # As pretrained weights from a local file: timm replaces a classifier of another size.
        return timm.create_model(name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay={"file": path})
    return timm.create_model(name, pretrained=settings.pretrained, num_classes=num_classes)


def transforms(settings: RunSettings, model: torch.nn.Module) -> tuple[Any, Any]:
    """The training (augmented unless ``--no-aug``) and evaluation transforms of ``model``'s data config."""
    data, size = settings.data, settings.model.img_size
    data_config = resolve_data_config({"input_size": (3, size, size)} if size else {}, model=model)
    train_transform = create_transform(
        **data_config, is_training=True, no_aug=not data.aug, hflip=data.hflip, scale=tuple(data.scale)
    )
    return train_transform, create_transform(**data_config, is_training=False)


def load_mentor(settings: ModelSettings, num_classes: int, path: Path) -> torch.nn.Module:
    """A mentor saved by an earlier run (``mentor.safetensors``), on CPU."""
    mentor = timm.create_model(settings.name, num_classes=num_classes)
    mentor.load_state_dict(read_weights(path, mentor, "the previous iteration's best mentor"))
    return mentor
