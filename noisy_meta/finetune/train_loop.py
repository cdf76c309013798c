"""One epoch of training and one evaluation, in the shape of timm's ``train_one_epoch`` / ``validate``.

`train_one_epoch` feeds the batches to `MetaNoiseWrapper.step` inside
``accelerator.accumulate``, steps the per-update schedule and stops the run after too many
consecutive non-finite updates; `validate` scores student and mentor; `predict_train_set`
gives the mentor's probabilities for every training sample on every rank (data cleaning,
cleanlab export), through `noisy_meta.labels.cleaning.iter_probabilities`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from ..labels.cleaning import LABEL_KEPT, iter_probabilities
from ..labels.noise import OUTSIDE
from ..labels.noisy_datasets import INDEX
from ..wrapper import MetaNoiseWrapper
from .checkpoint import RunCheckpoints, RunState, save_checkpoint
from .data import CLEAN_COLUMN, attach_transform, collate
from .models import transforms
from .progress import EpochProgress

if TYPE_CHECKING:
    from datasets import Dataset

    from .data import TrainBatches
    from .settings import RunContext
    from .tracking import RunTracker

#: The running means `train_one_epoch` reports.
TRAIN_STATS = ("loss", "ce_loss", "meta_loss", "labels_changed")
#: What the fast step did, averaged over the epoch's meta steps only (NaN in an epoch without one).
FAST_STATS = ("fast_divergence", "fast_step")


def train_one_epoch(
    epoch: int,
    wrapper: MetaNoiseWrapper,
    loader: TrainBatches,
    accelerator: Accelerator,
    scheduler: Any | None,
    progress: EpochProgress,
    state: RunState,
    checkpoints: RunCheckpoints,
    tracker: RunTracker | None = None,
) -> dict[str, float]:
    """Train one epoch; returns the mean of `TRAIN_STATS` over its batches and the last meta weight.

    ``tracker`` (``--log-with``) gets each update's figures and the learning rate it stepped with.

    A run resumed mid-epoch (``state.batch`` > 0) skips the batches done without loading them
    and carries on with the epoch's running sums from the checkpoint. A stream's epoch ends
    when the stream does (its length is an estimate).
    """
    wrapper.module.train()
    done = state.batch
    state.totals = dict(state.totals) if done else dict.fromkeys((*TRAIN_STATS, *FAST_STATS, "meta_steps"), 0.0)
    stats: dict[str, float] = {}
    for position, batch in enumerate(loader.batches(done), done + 1):
        lr = wrapper.optimizer.param_groups[0]["lr"]  # what this update steps with
        with accelerator.accumulate(wrapper.model):
            kept = batch.get(LABEL_KEPT)  # --clean-before mask; passed only then (a step overridden as (x, y) works)
            inputs, labels = batch["pixel_values"], batch["label"]
            stats = wrapper.step(inputs, labels) if kept is None else wrapper.step(inputs, labels, label_mask=kept)
        if state.aum is not None and wrapper.last_logits is not None:  # the label-error report, at no extra forward
            state.aum.update(batch["index"], wrapper.last_logits, labels)
        for key in TRAIN_STATS:
            state.totals[key] += stats[key]
        if math.isfinite(stats["fast_step"]):  # a meta step ran
            state.totals["meta_steps"] = state.totals.get("meta_steps", 0.0) + 1
            for key in FAST_STATS:
                state.totals[key] = state.totals.get(key, 0.0) + stats[key]
        state.batch = position
        if not wrapper.updates.accumulating:  # an update made or skipped: every rank sees the same
            if scheduler is not None:
                scheduler.step_update(num_updates=wrapper.num_updates)
            if tracker is not None and wrapper.updates.last == "stepped":
                tracker.log_update(wrapper.num_updates, stats, lr)
            skips = state.skips
            skips.consecutive = skips.consecutive + 1 if wrapper.updates.last == "skipped" else 0
            if skips.limit and skips.consecutive >= skips.limit:
                progress.stop()
                stop_after_skips(accelerator, wrapper, checkpoints.output_dir, skips.consecutive, epoch)
            checkpoints.after_update(last_batch=position == len(loader))
        progress.update(stats, batch["label"].shape[0] * accelerator.num_processes)
    progress.stop()
    means = {key: state.totals[key] / max(state.batch, 1) for key in TRAIN_STATS}
    meta_steps = state.totals.get("meta_steps", 0.0)
    fast = {key: state.totals.get(key, 0.0) / meta_steps if meta_steps else math.nan for key in FAST_STATS}
    return {**means, **fast, "meta_weight": stats.get("meta_weight", wrapper.meta_weight)}


@torch.no_grad()
def validate(accelerator: Accelerator, wrapper: MetaNoiseWrapper, loader: DataLoader) -> dict[str, float]:
    """Accuracy of student and mentor against the clean label where known, else the given label.

    Images from outside the label space (open-set noise) have no right answer: not scored.
    """
    student, mentor = wrapper.module, wrapper.mentor
    student.eval()
    correct = {"student": 0, "mentor": 0}
    total = 0
    for batch in loader:
        target = torch.where(batch[CLEAN_COLUMN] >= 0, batch[CLEAN_COLUMN], batch["label"])
        scored = batch[CLEAN_COLUMN] != OUTSIDE
        with accelerator.autocast():
            hits = {
                name: (model(batch["pixel_values"]).argmax(dim=1) == target) & scored
                for name, model in (("student", student), ("mentor", mentor))
            }
        for name, hit in hits.items():
            correct[name] += int(accelerator.gather_for_metrics(hit).sum())
        total += int(accelerator.gather_for_metrics(scored).sum())
    student.train()
    return {name: count / max(total, 1) for name, count in correct.items()}


def predict_train_set(context: RunContext, mentor: torch.nn.Module, train_set: Dataset) -> np.ndarray:
    """The mentor's probabilities ``[N, K]`` for every training sample, in row order, on every rank."""
    settings, accelerator = context.settings, context.accelerator
    _, eval_transform = transforms(settings, mentor)
    loader = accelerator.prepare_data_loader(
        DataLoader(
            attach_transform(train_set, eval_transform),
            batch_size=2 * settings.optim.batch_size,
            collate_fn=collate,
            num_workers=settings.data.workers,
        )
    )
    mentor = mentor.to(accelerator.device).eval()
    batch_indices: list[torch.Tensor] = []

    def images():
        for batch in loader:
            batch_indices.append(batch["index"])
            yield batch["pixel_values"]

    probs, indices = [], []
    for batch_probs in iter_probabilities(mentor, images(), accelerator.autocast):
        gathered = accelerator.gather_for_metrics((batch_probs, batch_indices.pop()))
        probs.append(gathered[0].double().cpu())
        indices.append(gathered[1].cpu())
    gathered_probs, gathered_index = torch.cat(probs).numpy(), torch.cat(indices).numpy()
    positions = np.asarray(train_set[INDEX])
    row_of = {int(index): row for row, index in enumerate(positions)}
    result = np.empty((len(positions), gathered_probs.shape[1]))
    result[[row_of[int(index)] for index in gathered_index]] = gathered_probs
    return result


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive updates were skipped because the loss or a gradient was not finite."""


def stop_after_skips(
    accelerator: Accelerator, wrapper: MetaNoiseWrapper, output_dir: Path, skips: int, epoch: int
) -> None:
    """Save the last good state in ``<output-dir>/stopped/`` and stop the run.

    Skipped updates leave parameters, optimizer state and mentor untouched, so the state now
    is the one after the last good update. ``last/`` keeps the checkpoint before it (the
    previous epoch's, or a ``--checkpoint-every`` one), from which ``--resume`` continues exactly.
    """
    stopped = output_dir / "stopped"
    save_checkpoint(accelerator, stopped, wrapper.module, wrapper.mentor)
    raise NonFiniteTrainingError(
        f"{skips} consecutive updates were skipped because the loss or a gradient was not finite "
        f"(epoch {epoch + 1}, after {wrapper.num_updates} good updates; {wrapper.num_skipped} skipped in all). "
        f"The last good weights are in {stopped}/ and {output_dir / 'last'}/ holds the checkpoint before them. "
        "Lower --lr or --inner-lr, add --clip-grad, look for non-finite inputs, or use bf16 rather than fp16; "
        "--max-consecutive-skips sets the limit (0: never stop)."
    )


def epoch_line(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch']}", f"loss {record['train_loss']:.3f}", f"w {record['meta_weight']:.2f}"]
    for split in ("val", "test"):
        if f"{split}_student" in record:
            parts.append(
                f"{split} student {100 * record[f'{split}_student']:.2f}% mentor {100 * record[f'{split}_mentor']:.2f}%"
            )
    parts.append(f"{record['images_per_second']:.0f} img/s")
    return " | ".join(parts)
