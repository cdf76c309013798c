"""`MetaNoiseTask`: MLNT as a timm training task, for timm's ``train.py`` and loops shaped like it.

timm's ``train_one_epoch`` runs ``result = task(input, target)`` under autocast, then the
backward of ``result['loss']`` (through its ``NativeScaler`` with AMP, divided over
gradient-accumulation micro-batches, under ``task.no_sync()`` on the ones that only
accumulate), clipping over ``task.get_clip_parameters()``, the optimizer step, ``zero_grad``
and ``task.update_ema(step=num_updates)``. This task fits that order:

* ``forward`` returns ``loss = CE + w * J``: the student's forward runs through the
  trainable module (DDP-wrapped after `prepare_distributed`), and the meta loss ``w * J`` is
  built on the *unwrapped* module from that forward's logits, so the script's one backward
  gives ``grad CE + w * grad J`` and DDP's reducer all-reduces it once; the second-order
  graph never runs the DDP module's forward again. The script's scaler, accumulation
  divisor and clipping then apply to the whole gradient exactly as to a plain loss.
* ``update_ema`` updates the mentor (and timm's own ``--model-ema`` copy, if set up); with
  several processes it first makes BatchNorm statistics equal on all ranks (``dist_bn``).
* the mentor, the update counter and the synthetic labels' generator are in
  ``get_task_state``, so the script's ``--resume`` continues exactly.

All M synthetic sets' graphs stay alive until the script's backward (as
`MetaNoiseWrapper.meta_loss`): memory grows with M; use `MetaNoiseWrapper.step` in a loop of
your own when it does not fit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from timm.task import TrainingTask
from torch import nn

from ..compat import explain_double_backward_errors, second_order_context
from ..config import LOOP_DEFAULTS, MetaNoiseConfig
from ..core import MetaCore
from ..runtime import TrainingRuntime, find_ddp, is_sharded, shared_seed, world_group

_logger = logging.getLogger(__name__)

#: MetaNoiseConfig fields of a task built without a config, over the library's defaults:
#: `noisy_meta.config.LOOP_DEFAULTS` (the fine-tuning recipe, uncompensated: one synthetic set on
#: every 5th update, the scale-free fast step), so that a first run with timm's own learning rates
#: (a warm-up from 1e-5) does no harm (benchmarks/RESULTS.md, "MLNT inside timm's train.py").
TASK_DEFAULTS: dict[str, Any] = dict(LOOP_DEFAULTS)


class MetaNoiseTask(TrainingTask):
    """Learning to learn from noisy labels (MLNT) as a ``timm.task.TrainingTask``.

    A drop-in for ``ClassificationTask`` in timm's ``train.py``, built where it is built and
    with its arguments (``model, criterion, device, dtype, verbose``): the CE term plus the meta
    loss in ``'loss'``, the mentor's EMA in `update_ema`, its state in `get_task_state`. The
    run's length is known only once the script has made its scheduler: one line there,
    ``task.fit_run_length(num_epochs * updates_per_epoch)``, fits the schedules to it.

    Args:
        model: the student (a timm model). Move it to its device before building the task.
        criterion: the loss on the given labels (e.g. the script's ``train_loss_fn`` with label
            smoothing); it replaces ``config.criterion``. Default: the config's
            (`MetaNoiseConfig.criterion`, cross-entropy unless set), as `MetaNoiseWrapper` uses.
        device: as for every timm task.
        dtype: as for every timm task.
        verbose: as for every timm task.
        config: a `MetaNoiseConfig`; ``None``: `TASK_DEFAULTS` (`noisy_meta.config.LOOP_DEFAULTS`) over the library's.
        total_updates: the run's optimizer updates, when known here (else `fit_run_length`);
            fits the schedule fields left at the library defaults to the run (as
            `MetaNoiseWrapper` does).
        loss_scaler: the script's ``NativeScaler`` (or a ``torch.amp.GradScaler``) under fp16:
            the inner fast-weight gradient is scaled with its scale as the outer one is, and an
            update the scaler skipped leaves the mentor and the counter where they were.
        mentor: optional starting mentor (the student's architecture); default a copy.
        optimizer: the script's optimizer, to refuse one it cannot be used with (`check_optimizer`).
        **overrides: `MetaNoiseConfig` fields replacing those of ``config``.

    Not supported: mixup / cutmix (soft targets have no neighbour label transfer: refused with
    a message), optimizers that need ``create_graph`` backward (``is_second_order``: refused
    by `check_optimizer`), and ``update_rule="sequential"`` (two optimizer steps per batch).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = True,
        *,
        config: MetaNoiseConfig | None = None,
        total_updates: int | None = None,
        loss_scaler: Any | None = None,
        mentor: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **overrides: Any,
    ) -> None:
        if isinstance(criterion, MetaNoiseConfig):
            raise TypeError(
                "MetaNoiseTask(model, criterion, device, dtype, verbose) takes its arguments in ClassificationTask's "
                "order: pass the MetaNoiseConfig as config=..."
            )
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if criterion is not None:
            overrides = {"criterion": criterion, **overrides}
        if optimizer is not None:
            self.check_optimizer(optimizer)
        if is_sharded(model):
            raise NotImplementedError(
                "MetaNoiseTask under FSDP2 is not supported: train.py's backward would leave the unsharded fast "
                "weights' gradients unreduced across processes; use MetaNoiseWrapper.step"
            )
        fix = "In timm's train.py add `task.fit_run_length(num_epochs * updates_per_epoch)` after "
        fix += "create_scheduler_v2 (or pass total_updates=)"
        #: The one core (`noisy_meta.core.MetaCore`): config, mentor, objective, fast-weight scope, counters, state.
        self.core = core = MetaCore(
            model,
            MetaNoiseConfig(**TASK_DEFAULTS) if config is None else config,
            total_updates,
            overrides,
            lambda seed, device: shared_seed(seed, device, world_group()),
            mentor,
            short_run_fix=fix,
            joint_only="MetaNoiseTask cannot run update_rule='sequential': train.py makes one optimizer step per batch",
        )
        self.trainable_module = model
        self.loss_scaler = loss_scaler
        self.criterion = core.criterion
        self.compat_changes = core.compat_changes
        #: Where the updates stand (`UpdateState`); the script says when one was made (`update_ema`).
        self.updates = core.updates
        self._scale_at_forward: float | None = None
        self._runtime = TrainingRuntime(model, optimizer)
        self._double_backward_checked = core.config.first_order
        #: What the last meta step did (`MetaNoiseWrapper.last_meta`), as detached scalars.
        self.last_meta: dict[str, torch.Tensor] = {}
        if verbose:
            _logger.info(f"{type(self).__name__}: {core.config}")

    # ------------------------------------------------------------------ the training step

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The student's forward, its loss on the given labels and the weighted meta loss.

        Returns ``loss`` (``ce_loss + meta_loss``, for the script's backward), ``output`` (the
        student's logits), ``ce_loss`` and ``meta_loss`` (detached, for logging), and the meta
        step's figures under ``meta/`` (`last_meta`: ``meta/meta_loss`` unweighted,
        ``meta/meta_weight``, ``meta/labels_changed``, ``meta/fast_divergence``, ``meta/fast_step``).
        """
        if target.is_floating_point() or target.dim() != 1:
            raise ValueError(
                f"MetaNoiseTask needs one class index per image (targets [B] of integers), got {target.dtype} "
                f"{list(target.shape)}: mixup / cutmix soft targets cannot be used for neighbour label "
                "transfer; run without --mixup / --cutmix (label smoothing in the criterion is fine)"
            )
        core = self.core
        target, _ = core.check_batch(input, target)
        with second_order_context(not core.config.first_order):
            output = self.trainable_module(input)
        core.check_outputs(output, target)
        ce_loss = self.criterion(output, target)  # the script's loss (the core's unless replaced on the task)
        scale = self._loss_scale()
        self._scale_at_forward = scale
        student = core.scope.around(input, output)
        weight = self.meta_weight
        meta_loss, meta = core.objective.loss(input, target, student, weight, scale)
        if not self._double_backward_checked and meta_loss.requires_grad:
            self._check_double_backward(meta_loss)
        self.last_meta = meta.figures(weight)
        return {
            "loss": ce_loss + meta_loss,
            "output": output,
            "ce_loss": ce_loss.detach(),
            "meta_loss": meta_loss.detach(),
            **{f"meta/{key}": value for key, value in self.last_meta.items()},
        }

    def fit_run_length(self, total_updates: int) -> None:
        """Fit the schedules left at the library defaults (ramp-up, mentor decay) to a run of
        ``total_updates`` optimizer updates, as ``total_updates=`` at construction would.

        In timm's ``train.py`` the run's length is known once the scheduler is made: add
        ``task.fit_run_length(num_epochs * updates_per_epoch)`` after ``create_scheduler_v2``.
        Call it before training (after a ``--resume`` too, with the same length).
        """
        self.core.fit_run_length(total_updates)
        if self.verbose:
            _logger.info(f"{type(self).__name__} fitted to {total_updates} updates: {self.config}")

    @property
    def config(self) -> MetaNoiseConfig:
        """The resolved `MetaNoiseConfig` (refitted by `fit_run_length`)."""
        return self.core.config

    @property
    def meta_weight(self) -> float:
        """The meta-loss weight ``w`` of the next update."""
        return self.core.meta_weight

    @property
    def num_updates(self) -> int:
        """Optimizer updates made so far (`UpdateState.num_updates`)."""
        return self.updates.num_updates

    @torch.no_grad()
    def update_ema(self, step: int | None = None) -> None:
        """After each optimizer update: timm's EMA (if set up), then the mentor and the counter.

        With a ``loss_scaler`` whose scale dropped since the last forward (it skipped the
        update for overflowing gradients), the mentor and the counter stay.
        """
        super().update_ema(step)
        scaler = self._scaler()
        if scaler is not None and self._scale_at_forward is not None and scaler.get_scale() < self._scale_at_forward:
            self.updates.record(stepped=False, complete=False)
            return
        self.updates.record(stepped=True)
        self.core.advance_mentor(self._runtime)

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse an optimizer that needs a ``create_graph`` backward (timm's ``is_second_order``)."""
        if getattr(optimizer, "is_second_order", False):
            raise ValueError(
                f"{type(optimizer).__name__} needs a create_graph backward (is_second_order); MetaNoiseTask's loss "
                "already holds MLNT's second-order graph: use a first-order optimizer (SGD, AdamW, ...)"
            )

    # ------------------------------------------------------------------ models and state

    @property
    def mentor(self) -> nn.Module:
        """The mentor (teacher) network, in eval mode."""
        return self.core.mentor.module

    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False, mentor: bool = False) -> nn.Module:
        """The model to validate: the student, timm's EMA copy (``ema=True``) or MLNT's mentor (``mentor=True``)."""
        if mentor:
            return self.mentor
        return super().get_eval_model(module, ema=ema)

    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        """The mentor's weights, the update counter and the synthetic labels' generator."""
        if ema:
            return {}
        return self.core.state_dict()

    def load_task_state(
        self, state: dict[str, Any] | None, strict: bool = True, module: nn.Module | None = None, ema: bool = False
    ) -> None:
        """Restore what `get_task_state` saved (a checkpoint without it is refused when ``strict``)."""
        if ema:
            return
        if not state:
            if strict:
                raise ValueError("the checkpoint has no MetaNoiseTask state (mentor, counter): was it saved by one?")
            return
        self.core.load_state_dict(state)

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs: Any) -> MetaNoiseTask:
        """Wrap the student in ``DistributedDataParallel`` (the mentor stays a plain module on every rank)."""
        from torch.nn.parallel import DistributedDataParallel

        self.trainable_module = DistributedDataParallel(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        self._runtime = TrainingRuntime(self.trainable_module, self._runtime.optimizer)
        return self

    def no_sync(self):
        """DDP's ``no_sync`` for the micro-batches that only accumulate (nothing without DDP)."""
        ddp = find_ddp(self.trainable_module)
        return ddp.no_sync() if ddp is not None else nullcontext()

    def _apply(self, fn, *args, **kwargs):
        """``task.to(device)`` and the like move the mentor with the task."""
        self.core.mentor.module._apply(fn)
        return super()._apply(fn, *args, **kwargs)

    def _check_double_backward(self, meta_loss: torch.Tensor) -> None:
        """On the first meta step in second order: one backward of the meta loss, here, so that an
        op without a double backward is named with the fix (`SecondOrderUnsupportedError`) rather
        than failing later inside the script's backward."""
        with explain_double_backward_errors():
            torch.autograd.grad(meta_loss, self.core.params, retain_graph=True, allow_unused=True)
        self._double_backward_checked = True

    def _scaler(self) -> Any | None:
        scaler = getattr(self.loss_scaler, "_scaler", self.loss_scaler)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _loss_scale(self) -> float:
        scaler = self._scaler()
        return float(scaler.get_scale()) if scaler is not None else 1.0
