"""Input checks of the meta step: a bad batch is refused before anything changes.

Every public entry point of `MetaNoiseWrapper` (``step``, ``meta_backward``, ``meta_loss``)
runs its batch through `check_batch`, and the model's logits through `check_outputs`, so a
user's mistake (soft labels, a batch smaller than ``k + 1``, labels out of range) is one
clear ``TypeError`` / ``ValueError`` instead of a shape error deep inside the meta step.
"""

from __future__ import annotations

import torch

from .config import MetaNoiseConfig


def check_batch(
    inputs: torch.Tensor, targets: torch.Tensor, config: MetaNoiseConfig, num_classes: int | None
) -> torch.Tensor:
    """Refuse a bad batch; return ``targets`` as int64 class indices.

    ``num_classes``: the model's declared class count (timm's ``num_classes``), if any.
    """
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f"inputs and targets must be tensors, got {type(inputs).__name__} and {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(
            f"targets must hold integer class indices (torch.long), got {targets.dtype}; "
            "soft or one-hot labels are not supported"
        )
    if targets.ndim != 1:
        raise ValueError(f"targets must have shape [B], got {list(targets.shape)}")
    if inputs.ndim == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets disagree on the batch size: inputs {list(inputs.shape)}, targets {list(targets.shape)}"
        )
    batch_size, k = targets.shape[0], config.num_neighbors
    if batch_size <= k and config.num_synthetic > 0:
        raise ValueError(
            f"a batch of {batch_size} samples is too small for num_neighbors={k}: each sample "
            f"needs {k} other samples. Use batches of at least {k + 1} (e.g. drop_last=True in "
            "the DataLoader) or lower num_neighbors"
        )
    if isinstance(num_classes, int):
        check_label_range(targets, num_classes)
    return targets.long()  # int32 / int16 / uint8 labels work as well


def check_label_mask(label_mask: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor | None:
    """``label_mask`` as a ``[B]`` bool tensor on the targets' device (``None`` stays ``None``)."""
    if label_mask is None:
        return None
    if not isinstance(label_mask, torch.Tensor) or label_mask.dtype != torch.bool:
        got = label_mask.dtype if isinstance(label_mask, torch.Tensor) else type(label_mask).__name__
        raise TypeError(f"label_mask must be a bool tensor (True: the given label counts), got {got}")
    if label_mask.shape != targets.shape:
        raise ValueError(f"label_mask must have the targets' shape {list(targets.shape)}, got {list(label_mask.shape)}")
    return label_mask.to(targets.device)


def check_outputs(outputs: torch.Tensor, targets: torch.Tensor, num_classes: int | None) -> None:
    """The model's output must be ``[B, C]`` floating-point logits that the labels fit."""
    if not isinstance(outputs, torch.Tensor) or outputs.ndim != 2 or outputs.shape[0] != targets.shape[0]:
        shape = list(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise ValueError(f"the model must return [B, C] logits for a batch of {targets.shape[0]}, got {shape}")
    if not outputs.is_floating_point():
        raise ValueError(f"the model must return floating-point logits, got {outputs.dtype}")
    if outputs.shape[1] != num_classes:  # else `check_batch` already checked the range
        check_label_range(targets, outputs.shape[1])


def check_label_range(targets: torch.Tensor, num_classes: int) -> None:
    low, high = torch.stack([targets.min(), targets.max()]).tolist()
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"targets must lie in [0, {num_classes}) for a {num_classes}-class model, got values from {low} to {high}"
        )


def check_features(features: torch.Tensor, batch_size: int) -> None:
    """Neighbour-search features must have one row per sample."""
    if not isinstance(features, torch.Tensor) or features.ndim < 2 or features.shape[0] != batch_size:
        shape = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"neighbour features must have shape [B, ...] with B={batch_size}, got {shape}")
