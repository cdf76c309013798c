"""The conventional loss on the given labels: cross-entropy or a loss that is robust to noisy labels.

Each is a frozen dataclass called as ``loss(logits, targets) -> scalar`` (the batch mean, in
float32 for half-precision logits), so a `MetaNoiseConfig` holding one stays comparable and
printable. `MetaNoiseConfig.criterion` names one (``"cross_entropy"``, ``"label_smoothing"``,
``"gce"``, ``"sce"``) or holds any callable; `resolve_criterion` turns either into the callable
`MetaNoiseWrapper` and `noisy_meta.timm.MetaNoiseTask` train with.

* `CrossEntropy`: the paper's loss; ``smoothing`` > 0 is label smoothing (timm's
  ``--smoothing``): the target puts ``1 - smoothing`` on the given label and spreads
  ``smoothing`` uniformly over all classes.
* `GeneralizedCrossEntropy` (Zhang & Sabuncu, NeurIPS 2018): ``(1 - p_y^q) / q``; ``q -> 0``
  is cross-entropy, ``q = 1`` the mean absolute error. A sample the model disagrees with
  gets a gradient ``p_y^q`` times cross-entropy's, so confidently contradicted labels (often
  the wrong ones) weigh less.
* `SymmetricCrossEntropy` (Wang et al., ICCV 2019): ``alpha * CE + beta * RCE``, the reverse
  cross-entropy ``RCE = -sum_k p_k log q_k`` against the one-hot label ``q`` with ``log 0``
  taken as ``log_zero`` (the paper's A = -4), which is ``-log_zero * (1 - p_y)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import CriterionSpec
from .fast_weights import upcast

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class CrossEntropy:
    """Cross-entropy, with label smoothing when ``smoothing`` > 0."""

    smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check(
            isinstance(self.smoothing, (int, float)) and 0.0 <= self.smoothing < 1.0,
            f"smoothing must be in [0, 1), got {self.smoothing!r}",
        )

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(upcast(logits), targets, label_smoothing=float(self.smoothing))


@dataclass(frozen=True)
class GeneralizedCrossEntropy:
    """Generalised cross-entropy ``mean((1 - p_y^q) / q)`` (Zhang & Sabuncu 2018)."""

    q: float = 0.7

    def __post_init__(self) -> None:
        _check(isinstance(self.q, (int, float)) and 0.0 < self.q <= 1.0, f"q must be in (0, 1], got {self.q!r}")

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p_y = F.log_softmax(upcast(logits), dim=1).gather(1, targets[:, None]).squeeze(1)
        return ((1.0 - torch.exp(self.q * log_p_y)) / self.q).mean()


@dataclass(frozen=True)
class SymmetricCrossEntropy:
    """Symmetric cross-entropy ``alpha * CE + beta * RCE`` (Wang et al. 2019), ``RCE = -log_zero * (1 - p_y)``."""

    alpha: float = 0.1
    beta: float = 1.0
    log_zero: float = -4.0

    def __post_init__(self) -> None:
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            _check(
                isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
                f"{name} must be >= 0, got {value!r}",
            )
        _check(self.alpha + self.beta > 0, "alpha and beta must not both be 0")
        valid = isinstance(self.log_zero, (int, float)) and self.log_zero < 0
        _check(valid, f"log_zero must be < 0, got {self.log_zero!r}")

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(upcast(logits), dim=1)
        log_p_y = log_probs.gather(1, targets[:, None]).squeeze(1)
        reverse = -self.log_zero * (1.0 - log_p_y.exp())
        return (self.alpha * -log_p_y + self.beta * reverse).mean()


#: The losses `MetaNoiseConfig.criterion` knows by name, with their usual settings.
NAMED_CRITERIA: dict[str, Criterion] = {
    "cross_entropy": CrossEntropy(),
    "label_smoothing": CrossEntropy(smoothing=0.1),
    "gce": GeneralizedCrossEntropy(),
    "sce": SymmetricCrossEntropy(),
}


def resolve_criterion(spec: CriterionSpec) -> Criterion:
    """The loss callable for a `MetaNoiseConfig.criterion` (a name of `NAMED_CRITERIA` or a callable)."""
    if isinstance(spec, str):
        if spec not in NAMED_CRITERIA:
            raise ValueError(f"criterion must be one of {tuple(NAMED_CRITERIA)} or a callable, got {spec!r}")
        return NAMED_CRITERIA[spec]
    if not callable(spec):
        raise TypeError(f"criterion must be a name or a callable (logits, targets) -> loss, got {spec!r}")
    return spec


def make_criterion(
    loss: str = "cross_entropy", *, smoothing: float = 0.0, q: float = 0.7, alpha: float = 0.1, beta: float = 1.0
) -> Criterion:
    """A loss from the command line's ``--loss`` / ``--smoothing`` / ``--gce-q`` / ``--sce-alpha`` / ``--sce-beta``.

    ``loss="cross_entropy"`` with ``smoothing`` > 0 is label smoothing (timm's ``--smoothing``);
    ``smoothing`` with another loss is refused rather than ignored.
    """
    if smoothing and loss != "cross_entropy":
        raise ValueError(f"smoothing applies to cross_entropy only, not to {loss!r}")
    if loss == "cross_entropy":
        return CrossEntropy(smoothing)
    if loss == "label_smoothing":
        return CrossEntropy(0.1)
    if loss == "gce":
        return GeneralizedCrossEntropy(q)
    if loss == "sce":
        return SymmetricCrossEntropy(alpha, beta)
    raise ValueError(f"loss must be one of {tuple(NAMED_CRITERIA)}, got {loss!r}")
