"""MLNT inside the Hugging Face ``Trainer``: `MetaNoiseTrainer`, a ``Trainer`` with MLNT's loss.

``pip install 'noisy-meta[hf]'``. Replace ``Trainer`` with `MetaNoiseTrainer`; everything
else of the Trainer stays (its optimizer, scheduler, gradient accumulation, mixed precision,
several processes, checkpoints, ``resume_from_checkpoint``, logging):

* `MetaNoiseTrainer.compute_loss` runs the student's forward through the Trainer's (possibly
  DDP-wrapped) model and returns ``CE + w * J``: the meta loss is built on the unwrapped
  module from that forward's logits (`MetaNoiseWrapper.meta_loss`), so the Trainer's one
  backward gives ``grad CE + w * grad J`` and its accumulation divisor, GradScaler and DDP
  all-reduce apply to the whole gradient. All M synthetic sets' graphs live until that
  backward: memory grows with M (the default, `LOOP_DEFAULTS`, has M = 1).
* after each optimizer update (``on_step_end``) the mentor averages the student and the
  counter advances; an update fp16's GradScaler skipped leaves both.
* every checkpoint the Trainer writes gets ``noisy_meta_state.safetensors`` (mentor, counters,
  synthetic labels' generator); ``train(resume_from_checkpoint=...)`` restores it.
* `MetaNoiseTrainer.evaluate` takes ``mentor=True`` to score the mentor (metrics prefixed
  ``eval_mentor``), after a resumed ``train`` too, even one with no steps left.
* the Trainer's training logs (its log history, its reporters) carry the meta step beside
  ``loss``: ``meta_loss``, ``meta_weight``, ``labels_changed`` and, where a fast step ran,
  ``fast_divergence`` and ``fast_step``, each the mean over the batches since the last log.

The model: a timm model (``timm.create_model``; batches ``{"pixel_values", "labels"}``) or
transformers' ``TimmWrapperForImageClassification`` (MLNT runs on its ``timm_model``).
The run's length fits the schedules (`MetaNoiseConfig.for_run_length` of the Trainer's
``max_steps``) unless the config sets them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(f"noisy_meta.hf needs transformers ({error}): pip install 'noisy-meta[hf]'") from error

from .config import LOOP_DEFAULTS, MetaNoiseConfig
from .core import require_joint_update
from .loop_state import STATE_FILE, load_loop_state, save_loop_state
from .wrapper import MetaNoiseWrapper

__all__ = ["MetaNoiseTrainer"]

#: The batch keys the trainer reads (the default collator's, and an image processor's).
INPUT_KEY, LABEL_KEY = "pixel_values", "labels"


class MetaNoiseTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with MLNT (the meta step's loss and an EMA mentor).

    Args:
        *args: as for ``Trainer`` (``model``, ``args``, ``train_dataset``, ...).
        meta_config: a `MetaNoiseConfig`; default `noisy_meta.config.LOOP_DEFAULTS` (the
            fine-tuning recipe, uncompensated: one synthetic set on every 5th update, the
            scale-free fast step).
        **kwargs: as for ``Trainer``.
    """

    def __init__(self, *args: Any, meta_config: MetaNoiseConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.meta_config = meta_config if meta_config is not None else MetaNoiseConfig(**LOOP_DEFAULTS)
        require_joint_update(
            self.meta_config,
            "MetaNoiseTrainer cannot run update_rule='sequential': the Trainer makes one step per batch",
        )
        #: The MLNT wrapper, built at the first training batch (the optimizer exists then).
        self.meta: MetaNoiseWrapper | None = None
        self.loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it over accumulation
        if not self.label_names:  # a timm model's forward names no labels: evaluation still scores them
            self.label_names = [LABEL_KEY]
        self._meta_resume: Path | None = None
        self._meta_sums: dict[str, torch.Tensor] = {}  # the meta step's figures since the last log
        self._meta_counts: dict[str, torch.Tensor] = {}
        self.add_callback(_MentorCallback(self))

    # ------------------------------------------------------------------ the loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``CE + w * J`` in training; in evaluation the loss on the given labels alone."""
        pixels, labels = inputs[INPUT_KEY], inputs[LABEL_KEY]
        meta = self._meta_wrapper() if model.training else None
        context = meta.forward_context() if meta is not None else contextlib.nullcontext()
        with context:
            logits = _logits(model(pixel_values=pixels) if _is_hf_model(model) else model(pixels))
        criterion = meta.criterion if meta is not None else self._criterion()
        loss = criterion(logits, labels)
        if meta is not None:
            loss = loss + meta.meta_loss(pixels, labels, logits)
            self._add_meta_figures(meta.last_meta)
        return (loss, {"logits": logits}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """``Trainer.log``; a training log (one with ``loss``) also gets the meta step's means since the last."""
        if "loss" in logs and self._meta_sums:
            for key, total in self._meta_sums.items():
                count = float(self._meta_counts[key])
                if count:
                    logs[key] = round(float(total) / count, 6)
            self._meta_sums, self._meta_counts = {}, {}
        super().log(logs, *args, **kwargs)

    def _add_meta_figures(self, figures: dict[str, torch.Tensor]) -> None:
        """Sum the figures on their device (no sync until the log); NaN ones (no fast step) are not counted."""
        for key, value in figures.items():
            finite = torch.isfinite(value)
            self._meta_sums[key] = self._meta_sums.get(key, 0.0) + torch.where(finite, value, 0.0)
            self._meta_counts[key] = self._meta_counts.get(key, 0.0) + finite.float()

    # ------------------------------------------------------------------ training, resuming, evaluating

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; a resumed run also restores MLNT's state from the checkpoint."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if resume_from_checkpoint:
            state = Path(resume_from_checkpoint) / STATE_FILE
            if not state.is_file():
                raise FileNotFoundError(
                    f"{resume_from_checkpoint} has no {STATE_FILE}: was it saved by MetaNoiseTrainer?"
                )
            self._meta_resume = state
        result = super().train(resume_from_checkpoint or None, *args, **kwargs)
        if self.meta is None and self._meta_resume is not None and self.optimizer is not None:
            self._meta_wrapper()  # a resumed run with no step left: its mentor still comes from the checkpoint
        return result

    def evaluate(self, *args: Any, mentor: bool = False, metric_key_prefix: str = "eval", **kwargs: Any) -> Any:
        """``Trainer.evaluate``; ``mentor=True`` scores the mentor instead (prefix ``eval_mentor``)."""
        if not mentor:
            return super().evaluate(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        if self.meta is None:
            raise RuntimeError("there is no mentor before training: call train() first")
        student, self.model = self.model, self._mentor_model()
        try:
            return super().evaluate(*args, metric_key_prefix=f"{metric_key_prefix}_mentor", **kwargs)
        finally:
            self.model = student

    # ------------------------------------------------------------------ pieces

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the image and label columns, whatever the model's forward is called with (a timm model's ``x``)."""
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, INPUT_KEY, LABEL_KEY, "label"]))

    def _meta_wrapper(self) -> MetaNoiseWrapper:
        if self.meta is None:
            student = self.model_wrapped if self.model_wrapped is not None else self.model
            if _is_hf_model(self.model):
                student = self.model.timm_model
            total = self.state.max_steps if self.state.max_steps > 0 else None
            self.meta = MetaNoiseWrapper(
                student, self.optimizer, self.meta_config, accelerator=self.accelerator, total_updates=total
            )
            if self._meta_resume is not None:
                self.meta.load_state_dict(load_loop_state(self._meta_resume))
                self._meta_resume = None
        return self.meta

    def _criterion(self) -> Any:
        from .losses import resolve_criterion

        return resolve_criterion(self.meta_config.criterion)

    def _mentor_model(self) -> nn.Module:
        """The mentor, called as the Trainer calls the student."""
        mentor = self.meta.mentor
        return _HFMentor(mentor) if _is_hf_model(self.model) else mentor

    def _save_meta_state(self) -> None:
        if self.meta is None or not self.args.should_save:
            return
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if folder.is_dir():
            save_loop_state(self.meta.state_dict(), folder / STATE_FILE)


class _MentorCallback(TrainerCallback):
    """The mentor's update after each optimizer step, and its state in each checkpoint."""

    def __init__(self, trainer: MetaNoiseTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer.meta is not None:
            self.trainer.meta.update_mentor()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._save_meta_state()


class _HFMentor(nn.Module):
    """The mentor answering as ``TimmWrapperForImageClassification`` does (``pixel_values=`` in, ``.logits`` out)."""

    def __init__(self, mentor: nn.Module) -> None:
        super().__init__()
        self.timm_model = mentor

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import ImageClassifierOutput

        return ImageClassifierOutput(logits=self.timm_model(pixel_values))


def _is_hf_model(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)  # under DDP
    return hasattr(inner, "timm_model") and isinstance(inner.timm_model, nn.Module)


def _logits(outputs: Any) -> torch.Tensor:
    return outputs.logits if hasattr(outputs, "logits") else outputs
