"""MLNT's meta objective: synthetic noisy labels, a fast-weight step per set, the KL to the mentor.

For a batch ``(x, y)`` and the mentor's predictions ``p = softmax(mentor(x))``:

1. M synthetic label sets ``y_m`` by random neighbour label transfer (`noisy_meta.synthetic`;
   neighbours in the mentor's, the student's or your own feature space);
2. for each set, fast weights ``theta'_m = theta - step(grad CE(f(x; theta), y_m))``, the step
   SGD's ``alpha * g`` or scale-free (`noisy_meta.fast_weights.InnerStep`), on the `FastPass`
   the scope gives;
3. ``J = mean_m KL(p || f(x; theta'_m))``, whose gradient ``w * grad J`` is added to the
   parameters one pass at a time (`MetaObjective.backward`) or returned as one
   differentiable loss (`MetaObjective.loss`).

`MetaObjective` owns the ``torch.Generator`` of the synthetic labels (one per device, seeded
with the run's shared seed), so that a run resumed from `state_dict` draws the same labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_features
from .compat import explain_double_backward_errors
from .config import MetaNoiseConfig
from .fast_scope import FastPass, StudentForward
from .fast_weights import FastStepSize, InnerStep, meta_losses, upcast
from .features import features_of
from .mentor import Mentor
from .synthetic import nearest_neighbors, neighbor_label_transfer


@dataclass
class MetaTargets:
    """What the meta step of one batch aims at: M synthetic label sets and the mentor's log-probabilities."""

    labels: torch.Tensor  # [M, B]
    mentor_log_probs: torch.Tensor  # [B, C]
    changed: torch.Tensor  # scalar: mean fraction of labels the sets changed


@dataclass
class MetaResult:
    """The meta loss ``J`` of one batch (detached), the fraction of labels changed, and (shared trunk
    only) the ``(trunk output, meta-gradient at it)`` pair to send back with the cross-entropy."""

    loss: torch.Tensor
    changed: torch.Tensor
    through: tuple[torch.Tensor, torch.Tensor | None] | None = None
    #: what the first set's fast step did: ``KL(student || fast student)`` and ``||theta' - theta|| / ||theta||``
    #: (NaN when no fast step ran)
    divergence: torch.Tensor | None = None
    relative_step: torch.Tensor | None = None

    @classmethod
    def off(cls, device: torch.device) -> MetaResult:
        """No meta step (weight 0)."""
        zero = torch.zeros((), device=device)
        return cls(zero, zero)

    def figures(self, weight: float) -> dict[str, torch.Tensor]:
        """What `MetaNoiseWrapper.last_meta` holds: the loss, its weight, the labels changed, the fast step's
        divergence and relative length (NaN when no fast step ran), as detached scalars on one device."""
        divergence, relative_step = self.fast_step_values()
        loss = self.loss.detach()
        dtype = torch.promote_types(loss.dtype, torch.float32)  # float64 stays float64
        return {
            "meta_loss": loss.to(dtype),
            "meta_weight": torch.tensor(float(weight), device=loss.device, dtype=dtype),
            "labels_changed": self.changed.detach().to(loss.device, dtype),
            "fast_divergence": divergence.to(dtype),
            "fast_step": relative_step.to(dtype),
        }

    def fast_step_values(self) -> list[torch.Tensor]:
        """``[divergence, relative_step]`` as scalars on the loss's device (NaN when no fast step ran)."""
        nan = torch.full((), float("nan"), device=self.loss.device)
        return [nan if v is None else v.to(nan.device) for v in (self.divergence, self.relative_step)]


class MetaObjective:
    """The meta step of MLNT for one student and its mentor.

    Args:
        config: the `MetaNoiseConfig`.
        student: the unwrapped student (neighbour features when ``feature_source="student"``).
        mentor: the `Mentor`.
        seed: the synthetic labels' seed (the same on every rank).
    """

    def __init__(self, config: MetaNoiseConfig, student: nn.Module, mentor: Mentor, seed: int) -> None:
        self.config = config
        self.student = student
        self.mentor = mentor
        self.seed = seed
        self.inner_step = InnerStep.of(config)
        #: sizes the fast step in the predictions (``config.inner_divergence``) and records what it did
        self.step_size = FastStepSize(config.inner_divergence)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._ensure_student_generator()

    def targets(self, inputs: torch.Tensor, labels: torch.Tensor) -> MetaTargets:
        """Synthetic label sets by neighbour label transfer, and the mentor's log-probabilities."""
        config = self.config
        if config.num_synthetic == 0:  # the consistency-only ablation: no neighbours needed
            mentor_logits = self.mentor.logits(inputs)
            empty = labels.new_empty((0, labels.shape[0]))
            return MetaTargets(empty, _log_probs(mentor_logits), torch.zeros((), device=labels.device))
        mentor_logits, features = self._mentor_logits_and_features(inputs)
        check_features(features, inputs.shape[0])
        neighbors = nearest_neighbors(features, config.num_neighbors)
        synthetic = neighbor_label_transfer(
            labels, neighbors, config.num_synthetic, config.perturb_ratio, self.generator(labels.device)
        )
        return MetaTargets(synthetic.labels, _log_probs(mentor_logits), synthetic.changed_fraction)

    def backward(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        student: StudentForward,
        weight: float,
        add_gradient: Callable[..., torch.Tensor | None],
        grad_scale: float = 1.0,
    ) -> MetaResult:
        """Hand ``weight * J`` to ``add_gradient`` one pass of sets at a time (memory flat in M); return what the
        meta step computed.

        ``add_gradient(loss, retain_graph=..., wrt=...)`` differentiates each pass's loss into the gradient
        (`noisy_meta.gradients.GradientUpdate.add`) and returns the gradient at ``wrt`` (the shared trunk's output)
        when asked; ``grad_scale`` is fp16's loss scale for the inner gradients."""
        if weight == 0.0:
            return MetaResult.off(student.logits.device)
        inputs, labels, student = self.meta_batch(inputs, labels, student)
        targets = self.targets(inputs, labels)
        fast = student.fast
        num_sets = targets.labels.shape[0]
        retain = not self.config.first_order or num_sets == 0  # M = 0: the loss is on the student's graph
        scale = weight / max(num_sets, 1)  # M = 0: one consistency loss
        total, trunk_grad = None, None
        self.step_size.divergence = self.step_size.relative_step = None
        with fast.open() as logits, explain_double_backward_errors():
            for losses in self._losses(fast, logits, targets, grad_scale):
                grad = add_gradient(losses.sum() * scale, retain_graph=retain, wrt=fast.trunk_leaf)
                if fast.trunk_leaf is not None:
                    trunk_grad = grad if trunk_grad is None else trunk_grad + grad
                total = losses.detach().sum() if total is None else total + losses.detach().sum()
        if total is None:  # the fast step's size was clipped: no meta step on this batch
            return MetaResult(student.logits.new_zeros(()).float(), targets.changed, student.through(None))
        sizes = self.step_size
        return MetaResult(
            total / max(num_sets, 1),
            targets.changed,
            student.through(trunk_grad),
            sizes.divergence,
            sizes.relative_step,
        )

    def loss(
        self, inputs: torch.Tensor, labels: torch.Tensor, student: StudentForward, weight: float, grad_scale: float
    ) -> tuple[torch.Tensor, MetaResult]:
        """``weight * J`` as one differentiable scalar (all M graphs alive until its backward), and what the meta
        step did (`MetaResult`, detached)."""
        zero = student.logits.new_zeros(()).float()
        if weight == 0.0:
            return zero, MetaResult.off(zero.device)
        inputs, labels, student = self.meta_batch(inputs, labels, student)
        targets = self.targets(inputs, labels)
        fast = student.fast
        self.step_size.divergence = self.step_size.relative_step = None
        with fast.open() as logits, explain_double_backward_errors():
            losses = list(self._losses(fast, logits, targets, grad_scale))
        if not losses:  # the fast step's size was clipped: no meta step on this batch
            return zero, MetaResult(zero, targets.changed)
        mean = torch.cat(losses).mean()
        sizes = self.step_size
        return mean * weight, MetaResult(mean.detach(), targets.changed, None, sizes.divergence, sizes.relative_step)

    def meta_batch(
        self, inputs: torch.Tensor, labels: torch.Tensor, student: StudentForward
    ) -> tuple[torch.Tensor, torch.Tensor, StudentForward]:
        """The samples the meta step runs on: a random subset when ``meta_batch_fraction < 1``."""
        batch_size = labels.shape[0]
        size = self.config.meta_batch_size(batch_size)
        if size == batch_size:
            return inputs, labels, student
        draws = torch.rand(batch_size, generator=self.generator(labels.device), device=labels.device)
        index = draws.argsort()[:size]
        return inputs[index], labels[index], student.subset(index)

    def _losses(
        self, fast: FastPass, logits: torch.Tensor, targets: MetaTargets, grad_scale: float
    ) -> Iterator[torch.Tensor]:
        """`meta_losses` of the sets in ``targets``, run on ``fast`` from its inner-step ``logits``."""
        config = self.config
        return meta_losses(
            fast.module,
            fast.inputs,
            upcast(logits),
            targets.labels,
            targets.mentor_log_probs,
            fast.names,
            self.inner_step,
            grad_scale,
            config.sets_per_pass,
            self.step_size,
        )

    def _mentor_logits_and_features(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        source = self.config.feature_source
        if source == "mentor":
            return self.mentor.logits_and_features(inputs)
        mentor_logits = self.mentor.logits(inputs)
        if source == "student":
            return mentor_logits, features_of(self.student, inputs)
        if isinstance(source, nn.Module):
            return mentor_logits, features_of(source, inputs)
        with torch.no_grad():
            return mentor_logits, source(inputs)

    # ------------------------------------------------------------------ the synthetic labels' RNG

    def generator(self, device: torch.device) -> torch.Generator:
        """The synthetic labels' generator on ``device`` (seeded with `seed` on first use)."""
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self._generators[device] = generator
        return generator

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "generators": {str(d): g.get_state() for d, g in self._generators.items()},
            "fast_step_size": self.step_size.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        if "fast_step_size" in state:  # checkpoints before 0.3 have none (their steps were never rescaled)
            self.step_size.load_state_dict(state["fast_step_size"])
        self._generators = {}
        for device, generator_state in state["generators"].items():
            self.generator(torch.device(device)).set_state(generator_state)
        self._ensure_student_generator()  # a state saved before the first meta step has none

    def _ensure_student_generator(self) -> None:
        """The generator on the student's device exists (seeded), so that every state dict holds it: one loaded in
        place, as torch.distributed.checkpoint loads, then restores it even before the first meta step."""
        self.generator(next(self.student.parameters()).device)


def _log_probs(mentor_logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(upcast(mentor_logits.detach()), dim=1)
