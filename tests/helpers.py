"""Builders and comparisons the test files share: tiny models, wrappers, batches, state snapshots."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from noisy_meta import MetaNoiseWrapper

#: The meta step at full weight from the first update (the library ramps it up from update 500).
FROM_FIRST_UPDATE = dict(ramp_start=0, ramp_end=0)
#: A small, fast meta step for 12-sample batches, seeded.
SMALL = dict(num_synthetic=3, num_neighbors=4, seed=0, **FROM_FIRST_UPDATE)


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
        "resnet18",
        num_classes=num_classes,
        in_chans=in_chans,
        layers=(1, 1, 1, 1),
        stem_width=8,
        channels=(8, 16, 16, 32),
    )


def settings(**overrides) -> dict:
    """`SMALL` with ``overrides``: `MetaNoiseWrapper` keyword arguments."""
    return {**SMALL, **overrides}


def make_wrapper(model: nn.Module, *, lr: float = 0.05, momentum: float = 0.9, **overrides) -> MetaNoiseWrapper:
    """``model`` with SGD(``lr``, ``momentum``) in a wrapper with `SMALL` settings and ``overrides``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return MetaNoiseWrapper(model, optimizer, **settings(**overrides))


def image_batch(seed: int = 0, batch_size: int = 12, size: int = 16, num_classes: int = 4):
    """Seeded random RGB images ``[B, 3, size, size]`` and labels."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, 3, size, size, generator=generator)
    return inputs, torch.randint(0, num_classes, (batch_size,), generator=generator)


def vector_batch(seed: int = 0, batch_size: int = 8):
    """Seeded float64 vectors ``[B, 6]`` and labels of 3 classes (for `TinyMLP`)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, 6, generator=generator, dtype=torch.float64)
    return inputs, torch.randint(0, 3, (batch_size,), generator=generator)


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``module``'s parameters and buffers."""
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``module``'s buffers (BatchNorm statistics)."""
    return {name: b.clone() for name, b in module.named_buffers()}


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bitwise equal, tensor by tensor."""
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_states_close(*pairs: tuple[nn.Module, nn.Module], rtol: float = 1e-6, atol: float = 1e-6) -> None:
    """Each ``(ours, reference)`` pair of modules holds the same parameters and buffers, within tolerance."""
    for ours, theirs in pairs:
        ours_state = state(ours)
        for name, value in state(theirs).items():
            torch.testing.assert_close(ours_state[name], value, rtol=rtol, atol=atol, msg=name)


def accumulating_reference(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, config, *, micro_batch: int, updates: int, lr: float
) -> MetaNoiseWrapper:
    """What a trainer with two micro-batches per update computes: on each micro-batch the forward,
    ``(CE + meta_loss) / 2`` backward; then one SGD step and `update_mentor`, ``updates`` times."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    reference = MetaNoiseWrapper(model, optimizer, config, total_updates=updates)
    for update in range(updates):
        for micro in range(2):
            rows = slice((2 * update + micro) * micro_batch, (2 * update + micro + 1) * micro_batch)
            with reference.forward_context():
                logits = model(inputs[rows])
            loss = F.cross_entropy(logits, labels[rows]) + reference.meta_loss(inputs[rows], labels[rows], logits)
            (loss / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
        reference.update_mentor()
    return reference
