"""MLNT inside PyTorch Lightning: `MetaNoiseCallback`, a callback and the loss of your ``training_step``.

``pip install 'noisy-meta[lightning]'``. Add the callback to the ``Trainer`` and return its
`MetaNoiseCallback.loss` from ``training_step``::

    mlnt = MetaNoiseCallback(student="model")           # the LightningModule's timm model

    class Classifier(L.LightningModule):
        def training_step(self, batch, batch_idx):
            images, labels = batch
            with mlnt.forward_context():                 # math attention for second order
                logits = self.model(images)
            return mlnt.loss(images, labels, logits)     # CE + w * J

    L.Trainer(callbacks=[mlnt], ...).fit(Classifier(), loader)

Lightning keeps its automatic optimisation: its backward of that loss gives ``grad CE + w *
grad J`` (the meta loss is built on the unwrapped student from your forward's logits), its
gradient accumulation divides it, its DDP all-reduces it once, its fp16 GradScaler scales it
(the inner gradient is scaled with the same scale). After each optimizer update the mentor
averages the student (BatchNorm statistics averaged over ranks first); the mentor, the
counters and the synthetic labels' generator are the callback's state in Lightning's
checkpoints, so ``fit(ckpt_path=...)`` resumes them. ``mlnt.mentor`` is the mentor, to validate.
`MetaNoiseCallback.loss` logs the meta step through the LightningModule's ``self.log`` (each
step and the epoch's mean, under ``meta/``): ``meta_loss``, ``meta_weight``, ``labels_changed``
and, where a fast step ran, ``fast_divergence`` and ``fast_step``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import LOOP_DEFAULTS, MetaNoiseConfig
from .core import require_joint_update
from .runtime import world_group
from .wrapper import MetaNoiseWrapper

try:
    import lightning as L
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(f"noisy_meta.lightning needs Lightning ({error}): pip install 'noisy-meta[lightning]'") from error

__all__ = ["MetaNoiseCallback"]


class MetaNoiseCallback(L.Callback):
    """MLNT for a Lightning ``Trainer``: the loss for ``training_step``, the mentor after each update.

    Args:
        config: a `MetaNoiseConfig`; default `noisy_meta.config.LOOP_DEFAULTS` (the fine-tuning
            recipe, uncompensated).
            Schedules left at the library defaults fit the Trainer's ``estimated_stepping_batches``.
        student: the attribute of the LightningModule holding the student (a module mapping
            images to logits, e.g. ``"model"``); ``None``: the LightningModule itself.
    """

    def __init__(self, config: MetaNoiseConfig | None = None, student: str | None = None) -> None:
        self.config = config if config is not None else MetaNoiseConfig(**LOOP_DEFAULTS)
        require_joint_update(
            self.config, "MetaNoiseCallback cannot run update_rule='sequential': Lightning steps once per batch"
        )
        self.student = student
        #: The MLNT wrapper, built when training starts (the optimizer exists then).
        self.meta: MetaNoiseWrapper | None = None
        self._trainer: Any = None
        self._pending_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ in training_step

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``CE + w * J`` of a batch whose student logits your ``training_step`` computed."""
        meta = self._wrapper()
        loss = meta.criterion(logits, targets) + meta.meta_loss(inputs, targets, logits)
        module = self._module
        if getattr(module, "_trainer", None) is not None:  # inside a Trainer's loop: its logger
            figures = {f"meta/{key}": value for key, value in meta.last_meta.items() if bool(torch.isfinite(value))}
            module.log_dict(figures, on_step=True, on_epoch=True, batch_size=int(targets.shape[0]))
        return loss

    def forward_context(self) -> contextlib.AbstractContextManager:
        """For your student forward: math attention when second order needs it."""
        from .compat import second_order_context

        return second_order_context(not self.config.first_order)

    @property
    def mentor(self) -> nn.Module:
        """The mentor (teacher), in eval mode."""
        if self.meta is None:
            raise RuntimeError("there is no mentor before training starts")
        return self.meta.mentor

    # ------------------------------------------------------------------ Lightning hooks

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Build the wrapper before the first forward (the mentor copies the student as it starts)."""
        self._trainer, self._module = trainer, pl_module
        self._wrapper()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """After an optimizer update (``global_step`` moved on): the mentor's average, the counter."""
        meta = self.meta
        if meta is not None and trainer.global_step > meta.num_updates:
            meta.update_mentor()

    def state_dict(self) -> dict[str, Any]:
        if self.meta is None:
            return self._pending_state or {}
        return self.meta.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.meta is None:
            self._pending_state = state_dict
        else:
            self.meta.load_state_dict(state_dict)

    # ------------------------------------------------------------------ pieces

    def _wrapper(self) -> MetaNoiseWrapper:
        if self.meta is not None:
            return self.meta
        trainer = self._trainer
        if trainer is None:
            raise RuntimeError("MetaNoiseCallback.loss runs inside training_step: pass the callback to the Trainer")
        self._trainer = None  # built once; the trainer is not kept
        module = self._module if self.student is None else getattr(self._module, self.student)
        optimizer = trainer.optimizers[0]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        total = trainer.estimated_stepping_batches
        total = int(total) if total not in (None, float("inf")) and total > 0 else None
        self.meta = MetaNoiseWrapper(module, optimizer, self.config, scaler=scaler, total_updates=total)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.meta.runtime.use_process_group(world_group())  # the student inside Lightning's DDP module
        if self._pending_state:
            self.meta.load_state_dict(self._pending_state)
            self._pending_state = None
        return self.meta
