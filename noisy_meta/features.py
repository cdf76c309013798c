"""Forward passes that must not train: mentor predictions and neighbour-search features."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode, restoring every submodule's own mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def is_timm_classifier(module: nn.Module) -> bool:
    """Whether ``module`` has timm's ``forward_features`` / ``forward_head`` split."""
    return callable(getattr(module, "forward_features", None)) and callable(getattr(module, "forward_head", None))


def pre_logits(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """A timm model's pooled pre-logits features: ``forward_head(forward_features(x), pre_logits=True)``."""
    return module.forward_head(module.forward_features(inputs), pre_logits=True)


@torch.no_grad()
def logits_and_features(module: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode logits and pooled pre-logits features, sharing one pass through the body.

    timm models give ``forward_head(forward_features(x), pre_logits=True)`` as features; other
    models give their outputs for both.
    """
    with eval_mode(module):
        if is_timm_classifier(module):
            body = module.forward_features(inputs)
            return module.forward_head(body), module.forward_head(body, pre_logits=True)
        outputs = module(inputs)
        return outputs, outputs


@torch.no_grad()
def features_of(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Eval-mode pooled pre-logits features (timm) or outputs (other models)."""
    with eval_mode(module):
        if is_timm_classifier(module):
            return pre_logits(module, inputs)
        return module(inputs)
