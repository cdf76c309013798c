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
    """The student: timm's model of that name, from its starting weights, with ``num_classes`` outputs."""
    model = _timm_model(settings, num_classes)
    if settings.freeze_backbone:  # a linear probe: only the classifier trains
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    return model


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
