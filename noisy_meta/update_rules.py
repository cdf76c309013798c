"""How one batch's losses become optimizer updates: the joint and the sequential rule.

Both rules run the same stages (`Stages`): the student's forward through the fast-weight
scope, its loss on the given labels (``CE``: cross-entropy or the configured criterion), the
meta objective's gradient, and the gradient update.

* `joint_update` (``update_rule="joint"``, the reference code): one optimizer step on
  ``grad CE + w * grad J``; inside an ``accelerator.accumulate`` window the gradient is held
  for the next micro-batch instead.
* `sequential_update` (``update_rule="sequential"``, the paper's notation): an optimizer step
  on ``w * grad J`` (from a forward that leaves BatchNorm statistics untouched), then a fresh
  forward and an optimizer step on ``grad CE``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .fast_scope import WholeModel
from .gradients import GradientUpdate
from .losses import Criterion
from .meta_objective import MetaObjective, MetaResult


@dataclass
class Stages:
    """The collaborators one MLNT iteration is made of."""

    scope: WholeModel
    meta: MetaObjective
    grads: GradientUpdate
    forward_context: Callable[[], contextlib.AbstractContextManager]
    check_outputs: Callable[[torch.Tensor, torch.Tensor], None]
    criterion: Criterion

    def label_loss(
        self, logits: torch.Tensor, targets: torch.Tensor, label_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss on the given labels (`MetaNoiseConfig.criterion`, cross-entropy by default), on the
        samples ``label_mask`` keeps (all when ``None``; 0 with the graph kept when it keeps none)."""
        self.check_outputs(logits, targets)
        if label_mask is None:
            return self.criterion(logits, targets)
        if not bool(label_mask.any()):
            return logits.sum() * 0.0
        return self.criterion(logits[label_mask], targets[label_mask])


@dataclass
class Outcome:
    """What an iteration did: its losses, whether the optimizer stepped, whether nothing was skipped."""

    ce_loss: torch.Tensor
    meta: MetaResult
    stepped: bool
    complete: bool

    def stats(self, weight: float, mentor_decay: float, num_skipped: int, num_updates: int) -> dict[str, float]:
        """`MetaNoiseWrapper.step`'s statistics (one device-to-host copy)."""
        dtype = torch.promote_types(self.ce_loss.dtype, self.meta.loss.dtype)
        values = [self.ce_loss.detach(), self.meta.loss, self.meta.changed, *self.meta.fast_step_values()]
        ce, meta, changed, divergence, relative_step = torch.stack([v.to(dtype) for v in values]).tolist()
        return {
            "loss": ce + weight * meta,
            "ce_loss": ce,
            "meta_loss": meta,
            "meta_weight": weight,
            "labels_changed": changed,
            "fast_divergence": divergence,
            "fast_step": relative_step,
            "mentor_decay": mentor_decay,
            "skipped": float(not self.complete),
            "num_skipped": float(num_skipped),
            "step": float(num_updates),
        }


def joint_update(
    stages: Stages, inputs: torch.Tensor, targets: torch.Tensor, weight: float, label_mask: torch.Tensor | None
) -> Outcome:
    """One optimizer step on ``grad CE + w * grad J`` (or the gradient held, mid accumulation)."""
    grads = stages.grads
    with stages.forward_context():
        student = stages.scope.forward(inputs, meta=weight > 0.0)
        ce_loss = stages.label_loss(student.logits, targets, label_mask)
        meta = stages.meta.backward(inputs, targets, student, weight, grads)
        grads.add(ce_loss, through=meta.through)
    if not grads.sync:
        grads.hold()
        return Outcome(ce_loss, meta, stepped=False, complete=True)
    applied = grads.apply(ce_loss, meta.loss)
    return Outcome(ce_loss, meta, stepped=applied, complete=applied)


def sequential_update(
    stages: Stages, inputs: torch.Tensor, targets: torch.Tensor, weight: float, label_mask: torch.Tensor | None
) -> Outcome:
    """An optimizer step on ``w * grad J``, then a fresh forward and one on ``grad CE``."""
    grads = stages.grads
    meta, meta_applied = MetaResult.off(inputs.device), True
    if weight > 0.0:
        with stages.forward_context():
            student = stages.scope.forward(inputs, keep_buffers=True)
            stages.check_outputs(student.logits, targets)
            meta = stages.meta.backward(inputs, targets, student, weight, grads)
        del student
        meta_applied = grads.apply(meta.loss)
    ce_loss = stages.label_loss(stages.scope.module(inputs), targets, label_mask)
    grads.add(ce_loss)
    applied = grads.apply(ce_loss)
    return Outcome(ce_loss, meta, stepped=applied, complete=applied and meta_applied)


UPDATE_RULES: dict[str, Callable[[Stages, torch.Tensor, torch.Tensor, float, torch.Tensor | None], Outcome]] = {
    "joint": joint_update,
    "sequential": sequential_update,
}
