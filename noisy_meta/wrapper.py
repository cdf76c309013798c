"""`MetaNoiseWrapper`: MLNT's meta step around any timm model and any optimizer.

The facade users hold. `MetaNoiseWrapper.step` is Algorithm 1 of the paper. The wrapper owns the
gradient and the optimizer step; everything else lives in one `noisy_meta.core.MetaCore` (the one
config, the counters, the state dict), which holds a collaborator per stage:

* `noisy_meta.mentor.Mentor`: the EMA (or frozen) teacher and its decay schedule;
* `noisy_meta.meta_objective.MetaObjective`: synthetic labels by neighbour label transfer, a
  fast-weight step per set and the KL to the mentor (it owns the synthetic labels' generator);
* `noisy_meta.fast_scope`: where the fast weights start (the whole model, or a suffix after
  a trunk that runs once);
* `noisy_meta.gradients.GradientUpdate`: adding, all-reducing, clipping and applying the
  gradient, skipping non-finite updates, rolling back on failure;
* `noisy_meta.update_state.UpdateState`: whether a micro-batch ends an update, what it did,
  the counters of updates made and skipped;
* `noisy_meta.runtime.TrainingRuntime`: Accelerate, DDP and AMP.

`meta_backward`, `meta_loss` and `update_mentor` give the same stages to loops of your own.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .compat import second_order_context
from .config import MetaNoiseConfig
from .core import MetaCore
from .fast_scope import SharedTrunk
from .gradients import GradientUpdate
from .meta_objective import MetaResult
from .runtime import TrainingRuntime
from .update_state import UpdateState


class MetaNoiseWrapper:
    """Learning to learn from noisy labels (MLNT) around a model and its optimizer.

    Each `step` runs one whole training iteration:

    1. the conventional forward of the student (it updates BatchNorm statistics once, exactly
       as plain training does) and its loss ``CE`` on the given labels (``criterion``, cross-entropy
       unless configured);
    2. the meta step, once the meta weight ``w`` is above zero: the mentor's predictions and
       neighbour-search features, M synthetic label sets by neighbour label transfer, and for
       each set one fast-weight SGD step and the KL divergence ``J_m`` from the mentor to the
       fast-weight student. The gradient of ``w * mean_m J_m`` is accumulated one set at a
       time (``sets_per_pass`` sets, batched, if asked), so memory does not grow with M;
    3. the update (by default one optimizer step on ``grad CE + w * grad J``), skipped when the
       loss or any gradient is not finite;
    4. the mentor's EMA update.

    Use it in your own loop instead with `meta_backward` (or `meta_loss`) after your forward
    and `update_mentor` after your optimizer step.

    With Hugging Face Accelerate, pass the prepared model and optimizer and the accelerator:
    `step` then runs under its autocast, applies fp16's GradScaler (to the inner gradients
    too), honours ``accelerator.accumulate`` and, with several processes, all-reduces the
    whole gradient once per update (see `noisy_meta.runtime`).

    Trade-offs worth knowing:

    * The second-order meta-gradient (the paper's maths) costs roughly one extra double
      backward per synthetic set; ``first_order=True`` is markedly cheaper and also works with
      ops that cannot be differentiated twice.
    * Cheaper meta steps: `MetaNoiseConfig.fast` (the affordable preset: one synthetic set, on
      every 5th update with the weight compensated) costs under twice a plain step;
      ``fast_params="head"`` or ``"last_stage"`` run the trunk before the fast weights once per
      iteration (each set runs only the rest); ``meta_every=N`` runs the meta step on every
      N-th update, ``meta_batch_fraction`` on part of the batch. What each keeps of MLNT's
      accuracy gain is in the README.
    * ``sets_per_pass > 1`` batches that many sets into one vector-Jacobian product and one
      ``vmap``'d forward: fewer, larger kernels (for GPUs) for that many graphs in memory.
    * For second order the student is switched, in place, to twice-differentiable ops where
      needed (timm attention off its fused kernel, ``nn.Hardsigmoid`` to a composite form);
      `compat_changes` lists what changed. The mentor keeps the original ops.
    * The mentor averages parameters *and* buffers (timm's ``ModelEmaV3`` default): averaging
      parameters only, as the reference code does, leaves the mentor's BatchNorm statistics at
      their initial values and its eval-mode predictions near chance.
    * The meta step runs on the eager, unwrapped module: ``torch.compile`` cannot
      differentiate twice, so a compiled model is trained through its ``_orig_mod``; DDP's
      reducer cannot serve ``autograd.grad`` either, so `step` all-reduces the gradient itself
      in one flat buffer after the backward instead of overlapping it with the backward.

    Args:
        model: the student, a timm model or any module mapping ``[B, ...]`` inputs to
            ``[B, C]`` logits. It may be ``torch.compile``-d.
        optimizer: any optimizer over the student's parameters.
        config: a `MetaNoiseConfig`; ``None`` uses the defaults.
        mentor: optional starting mentor with the student's architecture (e.g. the best
            mentor of a previous run, for iterative training); by default a copy of the
            student. The wrapper keeps its own copy and never changes the module you pass.
        accelerator: the ``accelerate.Accelerator`` that prepared ``model`` and ``optimizer``.
        scaler: a ``torch.amp.GradScaler`` for fp16 training without Accelerate.
        total_updates: the run's length in optimizer updates. The schedule fields left at the
            library defaults (ramp-up, mentor decay) then fit the run, as
            `MetaNoiseConfig.for_run_length` makes them: the meta step ramps up over 10%-40% of
            the run. Without it the library's long-run schedule applies (meta step from update
            500), and a warning says so if it has not started after 100 updates.
        **overrides: `MetaNoiseConfig` fields that replace those of ``config``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: MetaNoiseConfig | None = None,
        *,
        mentor: nn.Module | None = None,
        accelerator: Any | None = None,
        scaler: torch.amp.GradScaler | None = None,
        total_updates: int | None = None,
        **overrides: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.runtime = TrainingRuntime(model, optimizer, accelerator, scaler)
        accumulating = self.runtime.accumulation_steps > 1
        if accumulating and self.runtime.sharded:
            raise NotImplementedError("gradient accumulation under FSDP2 is not supported by the meta step yet")
        no_sequential = "update_rule='sequential' makes two optimizer updates per batch and cannot accumulate gradients"
        fix = "For a shorter run pass total_updates=<the run's optimizer updates> to MetaNoiseWrapper (or use "
        fix += "MetaNoiseConfig.for_run_length)"
        #: The one core (`noisy_meta.core.MetaCore`): config, mentor, objective, fast-weight scope, counters, state.
        self.core = core = MetaCore(
            model,
            config,
            total_updates,
            overrides,
            self.runtime.shared_seed,
            mentor,
            updates=UpdateState(self.runtime),
            short_run_fix=fix,
            joint_only=no_sequential if accumulating else None,
        )
        self.model, self.optimizer, self.module = model, optimizer, core.module
        self.compat_changes: list[str] = core.compat_changes
        #: Where the updates stand (`UpdateState`): accumulating, stepped or skipped, and the counters.
        self.updates = core.updates
        self._grads = GradientUpdate(core.params, self.runtime, core.config.clip_grad, self.updates)
        #: What the last meta step did (`step`, `meta_backward` or `meta_loss`), as detached scalar tensors
        #: (read them when you log: no device sync until then): ``meta_loss`` (``J``, unweighted),
        #: ``meta_weight``, ``labels_changed``, ``fast_divergence``, ``fast_step`` (NaN: no fast step ran).
        #: For the loops of other libraries, which log it in their own way.
        self.last_meta: dict[str, torch.Tensor] = {}
        #: The student's logits (detached) from the forward of the last `step`, before its update: what
        #: training-dynamics scores read at no extra forward (`noisy_meta.AreaUnderMargin`).
        self.last_logits: torch.Tensor | None = None

    # ------------------------------------------------------------------ one iteration

    def step(
        self, inputs: torch.Tensor, targets: torch.Tensor, label_mask: torch.Tensor | None = None
    ) -> dict[str, float]:
        """One whole MLNT iteration on a batch; returns its statistics.

        ``label_mask`` (``[B]`` bool, optional): the samples whose given label the loss on the
        labels uses. The others still go through the forward, the meta step (their labels seed
        the synthetic sets, the mentor's predictions on them are the meta targets) and hence the
        mentor: e.g. ``~flagged`` for the samples `noisy_meta.detect_label_noise` flags, so that
        detection removes suspected labels, not images.

        Keys: ``loss`` (``ce_loss + meta_weight * meta_loss``), ``ce_loss``, ``meta_loss``
        (mean KL over the synthetic sets), ``meta_weight``, ``labels_changed`` (mean fraction
        of labels the synthetic sets changed), ``fast_divergence`` and ``fast_step`` (how far
        the first set's fast step moved the predictions, ``KL(student || fast student)``, and
        the fast weights, ``||theta' - theta|| / ||theta||``; NaN when no meta step ran),
        ``mentor_decay``, ``skipped`` (1.0 when a
        non-finite loss or gradient skipped the update), ``num_skipped`` and ``step`` (updates
        so far). On any error the model's parameters, buffers and optimizer state are left as
        they were.

        Inside ``accelerator.accumulate(model)`` a batch that only accumulates gradients
        returns its losses with no update made (``step`` unchanged).
        """
        targets, label_mask = self.core.check_batch(inputs, targets, label_mask)
        index, weight = self.num_updates, self.meta_weight
        self._grads.begin()
        with self._grads.rollback(self.module) as rollback, self.runtime.autocast():
            if self.config.update_rule == "sequential":
                outcome = self._sequential_update(inputs, targets, weight, label_mask)
            else:
                outcome = self._joint_update(inputs, targets, weight, label_mask)
            if outcome.stepped:
                self.update_mentor()  # the mentor's EMA
        if not self.updates.accumulating:
            self.updates.record(outcome.stepped, outcome.complete)
        if not outcome.complete:
            rollback.restore()
        self.last_meta = outcome.meta.figures(weight)
        self.last_logits = outcome.logits
        return outcome.stats(weight, self.core.mentor.decay_at(index), self.num_skipped, self.num_updates)

    def _joint_update(
        self, inputs: torch.Tensor, targets: torch.Tensor, weight: float, label_mask: torch.Tensor | None
    ) -> Outcome:
        """``update_rule="joint"`` (the reference code): one optimizer step on ``grad CE + w * grad J``; inside an
        ``accelerator.accumulate`` window the gradient is held for the next micro-batch instead."""
        grads, core = self._grads, self.core
        with self.forward_context():
            student = core.scope.forward(inputs, meta=weight > 0.0)  # forward (BatchNorm statistics move once)
            label_loss = core.label_loss(student.logits, targets, label_mask)  # the loss on the given labels
            # the meta step: synthetic label sets, a fast step each, the KL to the mentor, its gradient
            meta = core.objective.backward(inputs, targets, student, weight, grads.add, self.runtime.loss_scale())
            grads.add(label_loss, through=meta.through)
        if not self.updates.ends_update:
            grads.hold()
            return Outcome(label_loss, meta, student.logits.detach(), stepped=False, complete=True)
        applied = grads.apply(label_loss, meta.loss)  # the update (skipped when not finite)
        return Outcome(label_loss, meta, student.logits.detach(), stepped=applied, complete=applied)

    def _sequential_update(
        self, inputs: torch.Tensor, targets: torch.Tensor, weight: float, label_mask: torch.Tensor | None
    ) -> Outcome:
        """``update_rule="sequential"`` (the paper's notation): an optimizer step on ``w * grad J`` (from a forward
        that leaves BatchNorm statistics untouched), then a fresh forward and an optimizer step on ``grad CE``."""
        grads, core = self._grads, self.core
        meta, meta_applied = MetaResult.off(inputs.device), True
        if weight > 0.0:
            with self.forward_context():
                student = core.scope.forward(inputs, keep_buffers=True)
                core.check_outputs(student.logits, targets)
                meta = core.objective.backward(inputs, targets, student, weight, grads.add, self.runtime.loss_scale())
            del student
            meta_applied = grads.apply(meta.loss)
        logits = core.scope.module(inputs)
        label_loss = core.label_loss(logits, targets, label_mask)
        grads.add(label_loss)
        applied = grads.apply(label_loss)
        return Outcome(label_loss, meta, logits.detach(), stepped=applied, complete=applied and meta_applied)

    @torch.no_grad()
    def update_mentor(self) -> None:
        """EMA-update the mentor from the student and advance the update counter.

        Call it once after each optimizer step of your own loop (`step` calls it for you). The
        counter drives the meta-weight ramp and the mentor decay schedule. With several
        processes it first makes BatchNorm statistics equal on all ranks (``dist_bn``). It does
        nothing on an ``accelerator.accumulate`` batch that made no update, or after an
        Accelerate optimizer step that fp16's GradScaler skipped.
        """
        if not self.updates.ends_update or getattr(self.optimizer, "step_was_skipped", False):
            return
        self.core.advance_mentor(self.runtime)

    # ------------------------------------------------------------------ your own loop

    def meta_backward(self, inputs: torch.Tensor, targets: torch.Tensor, outputs: torch.Tensor) -> dict[str, float]:
        """Accumulate ``w * grad J`` into the parameters' ``.grad`` for a batch you already ran.

        ``outputs`` are the student's logits for ``inputs`` from your own forward; their graph
        stays alive, so call your own ``loss.backward()`` (or ``accelerator.backward(loss)``)
        after this. One synthetic set's graph is held at a time. Returns ``meta_loss``,
        ``meta_weight``, ``labels_changed``, ``fast_divergence`` and ``fast_step`` (see `step`).
        For second order run that forward inside ``with wrapper.forward_context():``.

        The gradient is added to ``.grad`` directly (with the accelerator's accumulation
        divisor and fp16 loss scale), without firing DDP's hooks: your own backward through
        the DDP model then all-reduces meta and CE gradient together, once.
        """
        core = self._own_loop_core()
        targets, _ = core.check_batch(inputs, targets)
        core.check_outputs(outputs, targets)
        weight = self.meta_weight
        with self.runtime.autocast():
            student = core.scope.around(inputs, outputs)
            meta = core.objective.backward(inputs, targets, student, weight, self._grads.add, self.runtime.loss_scale())
        self.last_meta = meta.figures(weight)
        return {key: float(value) for key, value in self.last_meta.items()}

    def meta_loss(self, inputs: torch.Tensor, targets: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """The weighted meta loss ``w * mean_m J_m`` as one differentiable scalar.

        For loops that want a single ``(loss + meta).backward()`` (or ``accelerator.backward``,
        which also works through DDP). Unlike `meta_backward` it keeps all M graphs alive
        until that backward, so memory grows with M.
        """
        core = self._own_loop_core()
        targets, _ = core.check_batch(inputs, targets)
        core.check_outputs(outputs, targets)
        student = core.scope.around(inputs, outputs)
        weight = self.meta_weight
        with self.runtime.autocast():
            loss, meta = core.objective.loss(inputs, targets, student, weight, self.runtime.loss_scale())
        self.last_meta = meta.figures(weight)
        return loss

    def _own_loop_core(self) -> MetaCore:
        if self.core.sharded:
            raise NotImplementedError(
                "under FSDP2 the meta step runs in MetaNoiseWrapper.step only: your own backward would leave the "
                "unsharded fast weights' gradients unreduced across processes"
            )
        return self.core

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Context for your own student forward: math attention when second order needs it."""
        return second_order_context(not self.config.first_order)

    # ------------------------------------------------------------------ state

    @property
    def config(self) -> MetaNoiseConfig:
        """The resolved `MetaNoiseConfig` (``config`` with ``total_updates``' schedule and the overrides)."""
        return self.core.config

    @property
    def mentor(self) -> nn.Module:
        """The mentor (teacher) network, in eval mode."""
        return self.core.mentor.module

    @property
    def criterion(self) -> Any:
        """The loss on the given labels (``config.criterion``, resolved), for a forward of your own."""
        return self.core.criterion

    @property
    def num_updates(self) -> int:
        """Optimizer updates made so far (`UpdateState.num_updates`)."""
        return self.updates.num_updates

    @property
    def fast_steps_clipped(self) -> int:
        """Meta steps not trained on because the fast step sized in the predictions (``inner_divergence``) could not
        meet its target within bounds (`noisy_meta.fast_weights.FastStepSize`); resumed with the state dict."""
        return self.core.objective.step_size.num_clipped

    @property
    def num_skipped(self) -> int:
        """Updates skipped because a loss or a gradient was not finite (`UpdateState.num_skipped`)."""
        return self.updates.num_skipped

    @property
    def meta_weight(self) -> float:
        """The meta-loss weight ``w`` of the next update."""
        return self.core.meta_weight

    @property
    def fast_param_names(self) -> list[str]:
        """The parameters that get fast weights: ``config.fast_params`` resolved on the model (trainable ones only,
        so for a LoRA model the adapters and the trained head)."""
        return list(self.core.scope.fast_names)

    @property
    def fast_suffix(self) -> str | None:
        """``"head"`` / ``"last_stage"`` when the fast passes start there after a shared trunk (also
        chosen for ``fast_params="all"`` when only that suffix is trainable), else None."""
        scope = self.core.scope
        if not isinstance(scope, SharedTrunk):
            return None
        return "head" if scope.start_is_last else "last_stage"

    @property
    def trunk_shared(self) -> bool | None:
        """Whether the fast passes run only the suffix after a shared trunk (``fast_params="head"`` /
        ``"last_stage"``); ``None`` until the first meta step has checked that the split is exact."""
        scope = self.core.scope
        return scope.shared if isinstance(scope, SharedTrunk) else False

    def state_dict(self) -> dict[str, Any]:
        """Counters, synthetic-label RNG state, the fast step's scale and mentor weights, for checkpointing."""
        return self.core.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved."""
        self.core.load_state_dict(state)


@dataclass
class Outcome:
    """What an iteration did (`MetaNoiseWrapper.step`): its losses, whether the optimizer stepped, whether nothing
    was skipped."""

    label_loss: torch.Tensor
    meta: MetaResult
    logits: torch.Tensor
    stepped: bool
    complete: bool

    def stats(self, weight: float, mentor_decay: float, num_skipped: int, num_updates: int) -> dict[str, float]:
        """`MetaNoiseWrapper.step`'s statistics (one device-to-host copy)."""
        dtype = torch.promote_types(self.label_loss.dtype, self.meta.loss.dtype)
        values = [self.label_loss.detach(), self.meta.loss, self.meta.changed, *self.meta.fast_step_values()]
        label, meta, changed, divergence, relative_step = torch.stack([v.to(dtype) for v in values]).tolist()
        return {
            "loss": label + weight * meta,
            "ce_loss": label,  # the loss on the given labels (cross-entropy unless configured), named as in 0.1
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
