"""The timm models of a fine-tuning run: the student, its transforms, a saved mentor."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import create_transform, resolve_data_config

from .checkpoint import check_body_weights, read_weights


def create_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    model = _timm_model(args, num_classes)
    if args.freeze_backbone:  # a linear probe: only the classifier trains
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    return model


def _timm_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    if args.checkpoint is not None:
        if not os.path.isfile(args.checkpoint):
            raise FileNotFoundError(f"--checkpoint: no file at {args.checkpoint}")
        path = os.path.abspath(args.checkpoint)
        check_body_weights(path, timm.create_model(args.model, num_classes=num_classes), f"--model {args.model}")
        # As pretrained weights from a local file: timm replaces a classifier of another size.
        return timm.create_model(
            args.model, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay={"file": path}
        )
    return timm.create_model(args.model, pretrained=args.pretrained, num_classes=num_classes)


def transforms(args: argparse.Namespace, model: torch.nn.Module) -> tuple[Any, Any]:
    size = args.img_size
    data_config = resolve_data_config({"input_size": (3, size, size)} if size else {}, model=model)
    train_transform = create_transform(
        **data_config, is_training=True, no_aug=not args.aug, hflip=args.hflip, scale=tuple(args.scale)
    )
    return train_transform, create_transform(**data_config, is_training=False)


def load_mentor(args: argparse.Namespace, num_classes: int, path: Path) -> torch.nn.Module:
    """A mentor saved by an earlier run (``mentor.safetensors``), on CPU."""
    mentor = timm.create_model(args.model, num_classes=num_classes)
    mentor.load_state_dict(read_weights(path, mentor, "the previous iteration's best mentor"))
    return mentor
