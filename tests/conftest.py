"""Shared fixtures: tiny models and a small offline data set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import TinyMLP


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

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    def build(**kwargs):
        return Accelerator(cpu=True, **kwargs)

    reset()  # what another library's trainer left (the Hugging Face Trainer builds an Accelerator)
    yield build
    reset()


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> Path:
    """320 training and 100 test digits of the embedded MNIST, as a save_to_disk directory."""
    from noisy_meta.finetune.data import embedded_mnist

    data = embedded_mnist()
    data["train"] = data["train"].select(range(320))
    data["test"] = data["test"].select(range(100))
    path = tmp_path_factory.mktemp("data") / "tiny-mnist"
    data.save_to_disk(str(path))
    return path
