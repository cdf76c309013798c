"""Shared fixtures: tiny models and a small offline data set."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn


class TinyMLP(nn.Module):
    """Two-layer tanh MLP: smooth, so finite differences of the meta loss are accurate."""

    def __init__(self, in_features: int = 6, hidden: int = 5, num_classes: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def tiny_resnet(num_classes: int = 4, in_chans: int = 3) -> nn.Module:
    """A BatchNorm ResNet with one basic block per stage (timm)."""
    return timm.create_model(
        "resnet18", num_classes=num_classes, in_chans=in_chans, layers=(1, 1, 1, 1),
        stem_width=8, channels=(8, 16, 16, 32),
    )


@pytest.fixture
def mlp64() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP().double()


@pytest.fixture
def batch64() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(12, 6, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 3, (12,), generator=generator)
    return inputs, targets


@pytest.fixture
def make_accelerator():
    """Build ``accelerate.Accelerator`` objects; their shared global state is reset afterwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def build(**kwargs):
        return Accelerator(cpu=True, **kwargs)

    yield build
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
