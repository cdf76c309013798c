"""The fine-tuning run behind `examples/finetune.py`, read top to bottom.

Accelerate does devices, mixed precision and processes; `MetaNoiseWrapper` does MLNT;
Hugging Face datasets feeds the images; checkpoints are safetensors; rich shows progress.

One epoch (`train_one_epoch`, in the shape of timm's ``train_one_epoch``) feeds the batches to
`MetaNoiseWrapper.step` inside ``accelerator.accumulate``, steps the per-update schedule and
stops the run after too many consecutive non-finite updates; `validate` scores student and
mentor; `predict_train_set` gives the mentor's probabilities for every training sample on
every rank (data cleaning, cleanlab export).

MLNT's iterative training (``--iterations``, `train_iterations`): from the second run on, the
previous run's best mentor judges the original training split, the samples it flags are removed
or relabelled (`noisy_meta.labels.cleaning`), and it mentors the next run. Each run lives in
``<output-dir>/iteration_<k>/``.

Processes: `make_accelerator` turns a multi-process launch on a machine without an accelerator into
CPU processes (gloo); `check_ranks_agree` compares every rank's weights with one small
all-gather (after ``--resume``, where a bad load would otherwise go unnoticed).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
from datasets import Dataset, IterableDataset
from rich.console import Console
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader

from ..labels.cleaning import LABEL_KEPT, CleaningReport, clean_dataset, iter_probabilities, save_cleanlab_inputs
from ..labels.dynamics import AreaUnderMargin
from ..labels.noise import OUTSIDE
from ..labels.noisy_datasets import INDEX, LABEL
from ..runtime import fully_shard_trunk, is_dtensor
from ..wrapper import MetaNoiseWrapper
from .checkpoint import (
    CheckpointError,
    MetricsLog,
    RunCheckpoints,
    RunState,
    StopSignals,
    WholeMentorState,
    check_checkpoint,
    find_checkpoint,
    load_sharded_training,
    read_position,
    save_checkpoint,
)
from .data import (
    CLEAN_COLUMN,
    SeededAugmentation,
    Splits,
    TrainBatches,
    apply_label_issues,
    attach_transform,
    clean_before_training,
    collate,
    load_splits,
    train_batches,
)
from .export import export_model, push_to_hub
from .flags import previous_run, recorded_flags, resume_differences, write_args_file
from .models import create_model, load_mentor, transforms
from .report import EpochProgress, iterations_table, summary_table, write_label_issues, write_report
from .settings import (
    ARGS_FILE,
    CLEANING_FILE,
    LABEL_ISSUES_FILE,
    MENTOR_FILE,
    METRICS_FILE,
    PRED_PROBS_FILE,
    REPORT_FILE,
    TRACKING_DIR,
    RunContext,
    RunSettings,
)
from .tracking import RunTracker, check_trackers

__all__ = ["run"]

#: Columns of the output when it is not a terminal (a scheduler's log file): rich's default of
#: 80 would cut the progress line and wrap messages.
LOG_WIDTH = 160


def run(settings: RunSettings) -> dict[str, Any]:
    """One training run, or ``--iterations K`` runs with data cleaning in between.

    ``settings``: checked ones (`noisy_meta.finetune.cli.parse_settings`).
    """
    accelerator = make_accelerator(settings)
    console = Console(quiet=not accelerator.is_main_process, width=None if sys.stdout.isatty() else LOG_WIDTH)
    experiment = settings.experiment if settings.output.log_with else None  # no --log-with: nothing to log to
    context = RunContext(
        settings, accelerator, console, RunTracker(accelerator, experiment, recorded_flags(settings.flags))
    )
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
        console.print(
            f"[yellow]warning:[/] Accelerate runs fp16 on {accelerator.device.type} without autocast: training in fp32"
        )
    set_seed(settings.control.seed)
    where = "the embedded data" if settings.data.embedded else "this data set"
    console.print(f"defaults for {where}: {dict(settings.data_set_defaults)}")
    output_dir = settings.output.output_dir
    if accelerator.is_main_process:
        if settings.control.overwrite:
            _remove_previous_run(console, output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    splits = load_splits(context)
    if settings.clean_before != "off":  # every rank flags the same images (same weights, a deterministic search)
        cleaned = clean_before_training(context, splits.train, splits.num_classes, output_dir)
        splits = dataclasses.replace(splits, train=cleaned)
    if settings.meta.label_issues:  # an earlier run's report, as written or as a person edited it
        splits = dataclasses.replace(splits, train=apply_label_issues(context, splits.train, splits.num_classes))
    iterations = settings.iterative.iterations
    if iterations == 1:
        record = _train_run(context, splits, splits.train, output_dir)
    else:
        if accelerator.is_main_process:
            write_args_file(output_dir / ARGS_FILE, settings.flags)  # each iteration's has its MetaNoiseConfig
        record = train_iterations(context, splits, output_dir)
        _write_report(context, output_dir)
    final_dir = output_dir if iterations == 1 else output_dir / f"iteration_{iterations}"
    if settings.iterative.export_pred_probs:
        mentor = load_mentor(settings.model, splits.num_classes, find_checkpoint(final_dir / "best") / MENTOR_FILE)
        probs = predict_train_set(context, mentor, splits.train)
        if accelerator.is_main_process:
            save_cleanlab_inputs(output_dir / PRED_PROBS_FILE, splits.train[LABEL], probs, splits.train[INDEX])
            console.print(f"best mentor's training-set probabilities for cleanlab: {output_dir / PRED_PROBS_FILE}")
    if settings.output.export_dir is not None and accelerator.is_main_process:
        _export(context, splits, final_dir)
    accelerator.wait_for_everyone()  # every rank done (the main one wrote the summary) before the group goes
    accelerator.end_training()
    return record


def _export(context: RunContext, splits: Splits, run_dir: Path) -> None:
    """``--export-dir`` (and ``--push-to-hub``): the kept model with timm's ``save_for_hf`` and a model card."""
    settings, console = context.settings, context.console
    export_dir = export_model(context, splits, run_dir)
    console.print(f"exported the kept model to {export_dir}/ (timm.create_model('local-dir:{export_dir}'))")
    repo = settings.output.push_to_hub
    if repo:
        try:
            console.print(f"pushed to {push_to_hub(export_dir, repo)}")
        except Exception as error:  # noqa: BLE001 -- any hub failure leaves the export on disk, said in one line
            raise OSError(f"--push-to-hub {repo}: the upload failed ({error}); the export is in {export_dir}") from None


def _write_report(context: RunContext, output_dir: Path) -> None:
    """``report.png`` from the run's files (main process); without matplotlib, a line saying so."""
    if not context.is_main_process:
        return
    try:
        experiment = context.settings.experiment
        path = write_report(
            output_dir, experiment if output_dir.name == experiment else f"{experiment}: {output_dir.name}"
        )
    except ImportError as error:
        context.console.print(f"[yellow]no {REPORT_FILE}:[/] {error}")
        return
    if path is not None:
        context.console.print(f"learning curves in {path}")


def _remove_previous_run(console: Console, output_dir: Path) -> None:
    """``--overwrite``: delete what an earlier run left in ``output_dir`` (nothing else there)."""
    found = previous_run(output_dir)
    for name in found:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if found:
        console.print(f"--overwrite: removed the earlier run's {', '.join(found)} from {output_dir}")


@dataclass
class Training:
    """What one run trains with, prepared by Accelerate."""

    wrapper: MetaNoiseWrapper
    optimizer: torch.optim.Optimizer
    train_batches: TrainBatches
    eval_loaders: dict[str, DataLoader]
    scheduler: Any | None
    augmentation: SeededAugmentation


def _train_run(
    context: RunContext,
    splits: Splits,
    train_set: Dataset | IterableDataset,
    output_dir: Path,
    mentor: torch.nn.Module | None = None,
    resume: bool | None = None,
) -> dict[str, Any]:
    """One whole training run into ``output_dir``; returns the last epoch's metrics record.

    ``mentor`` (iterative training) is used as the mentor from the start, with
    ``--iteration-mentor`` deciding whether it keeps averaging the student. ``resume``: whether
    to continue from a checkpoint (default: with ``--resume``).
    """
    settings, accelerator, console = context.settings, context.accelerator, context.console
    epochs, control = settings.optim.epochs, settings.control
    training, state, log = _start_run(context, splits, train_set, output_dir, mentor, resume)
    wrapper, batches = training.wrapper, training.train_batches
    progress = EpochProgress(console, enabled=accelerator.is_main_process, log_interval=settings.output.log_interval)
    record: dict[str, Any] = {}
    with StopSignals() as signals:
        flags = recorded_flags(settings.flags)
        checkpoints = RunCheckpoints(
            accelerator, wrapper, state, output_dir, control.checkpoint_every, control.keep_checkpoints, signals, flags
        )
        for epoch in range(state.epoch, epochs):
            batches.set_epoch(epoch)
            training.augmentation.epoch = epoch
            started = time.perf_counter()
            progress.start(epoch, epochs, len(batches), done=state.batch)
            train_stats = train_one_epoch(
                epoch, wrapper, batches, accelerator, training.scheduler, progress, state, checkpoints, context.tracker
            )
            if training.scheduler is not None:
                training.scheduler.step(epoch + 1)
            accuracy = {name: validate(accelerator, wrapper, loader) for name, loader in training.eval_loaders.items()}
            record = {
                "epoch": epoch + 1,  # epochs done, as the table and the progress count them
                "train_samples": batches.rows,
                **_training_record(training, train_stats, progress.throughput, time.perf_counter() - started),
                **{f"{split}_{who}": value for split, result in accuracy.items() for who, value in result.items()},
            }
            console.print(epoch_line(record))
            if accelerator.is_main_process:  # before the checkpoint: a resume drops records it has not reached
                log.append(record)
            context.tracker.log_epoch(record)
            checkpoints.after_epoch(record, final=epoch + 1 == epochs)
    return _finish_run(context, splits, train_set, output_dir, training, state, log) or record


def _start_run(
    context: RunContext,
    splits: Splits,
    train_set: Dataset | IterableDataset,
    output_dir: Path,
    mentor: torch.nn.Module | None,
    resume: bool | None,
) -> tuple[Training, RunState, MetricsLog]:
    """Everything before the first epoch: the model, wrapper and loaders, the run's checkpointed state (resumed when
    asked), ``args.yaml`` and the metrics log (emptied past the resumed epoch)."""
    settings, accelerator = context.settings, context.accelerator
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    training = _prepare(context, splits, train_set, mentor)
    wrapper = training.wrapper
    aum = AreaUnderMargin(max(train_set[INDEX]) + 1) if isinstance(train_set, Dataset) and len(train_set) else None
    state = RunState(settings.control.max_consecutive_skips, aum)
    meta_state = WholeMentorState(wrapper) if settings.optim.fsdp else wrapper
    accelerator.register_for_checkpointing(meta_state, state, *filter(None, [training.scheduler]))
    if settings.control.resume is not None if resume is None else resume:
        _resume(context, wrapper, state, output_dir)
    if accelerator.is_main_process:
        write_args_file(output_dir / ARGS_FILE, settings.flags, wrapper.config)
    log = MetricsLog(output_dir / METRICS_FILE)
    if accelerator.is_main_process:
        log.truncate(state.epoch)  # a fresh run starts an empty log; a resumed one drops later epochs
    accelerator.wait_for_everyone()
    return training, state, log


def _finish_run(
    context: RunContext,
    splits: Splits,
    train_set: Dataset | IterableDataset,
    output_dir: Path,
    training: Training,
    state: RunState,
    log: MetricsLog,
) -> dict[str, Any] | None:
    """What a finished run leaves: the summary table, the trackers' end, ``report.png``, the label-error report;
    returns the last epoch's record as the log holds it (on the main process)."""
    accelerator, console = context.accelerator, context.console
    record = None
    if accelerator.is_main_process:
        records = log.read()
        console.print(summary_table(records, state.best_epoch))
        console.print(f"checkpoints and metrics in {output_dir}/ (last/, best/, {METRICS_FILE})")
        record = records[-1] if records else None
    context.tracker.finished_run(training.wrapper.num_updates)
    _write_report(context, output_dir)
    if state.aum is not None:
        state.aum.all_reduce()  # every rank's margins since the last checkpoint
        if accelerator.is_main_process:
            issues = write_label_issues(output_dir, state.aum, train_set, splits.class_names)
            console.print(f"label issues: {issues.line()}; ranked in {output_dir / LABEL_ISSUES_FILE}")
    return record


def _training_record(training: Training, stats: dict[str, float], throughput: float, seconds: float) -> dict[str, Any]:
    """An epoch's training figures, as ``metrics.jsonl`` records them."""
    wrapper = training.wrapper
    return {
        **{f"train_{key}": stats[key] for key in TRAIN_STATS},
        **{key: stats[key] if math.isfinite(stats[key]) else None for key in FAST_STATS},  # None: no meta step
        "meta_weight": stats["meta_weight"],
        "updates": wrapper.num_updates,
        "num_skipped": wrapper.num_skipped,
        "fast_steps_clipped": wrapper.fast_steps_clipped,
        "lr": training.optimizer.param_groups[0]["lr"],
        "seconds": seconds,
        "images_per_second": throughput,
    }


def _prepare(
    context: RunContext, splits: Splits, train_set: Dataset | IterableDataset, mentor: torch.nn.Module | None
) -> Training:
    """Model, loaders, optimizer and schedule prepared by Accelerate, and the MLNT wrapper around them."""
    settings, accelerator, console = context.settings, context.accelerator, context.console
    optim = settings.optim
    model = create_model(settings.model, splits.num_classes)
    train_transform, eval_transform = transforms(settings, model)
    augmentation = SeededAugmentation(train_transform, settings.control.seed)
    batches = train_batches(context, splits, train_set, augmentation)
    eval_loaders = {
        name: DataLoader(
            attach_transform(split, eval_transform),
            batch_size=2 * optim.batch_size,
            collate_fn=collate,
            num_workers=settings.data.workers,
        )
        for name, split in (("val", splits.validation), ("test", splits.test))
        if split is not None
    }
    if len(batches) == 0:
        raise ValueError(
            f"the training split ({batches.rows} samples) is smaller than one batch ({optim.batch_size}) per process"
        )
    sharded_mentor = None
    if optim.fsdp:  # Accelerate neither places nor wraps it: its own FSDP would shard the fast weights too
        model, sharded_mentor = shard_student_and_mentor(accelerator, model, settings.meta_config(1)[0].fast_params)
    optimizer = create_optimizer_v2(
        model, opt=optim.opt, lr=optim.lr, weight_decay=optim.weight_decay, momentum=optim.momentum
    )
    if not optim.fsdp:
        model, optimizer = accelerator.prepare(model, optimizer)
    batches.prepare(accelerator)
    loaders = [accelerator.prepare(loader) for loader in eval_loaders.values()]
    updates_per_epoch = math.ceil(len(batches) / optim.grad_accum_steps)  # the last window syncs early
    scheduler = None
    if optim.sched != "none":
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=optim.sched,
            num_epochs=optim.epochs,
            warmup_epochs=optim.warmup_epochs,
            updates_per_epoch=updates_per_epoch,
        )
    config, automatic = settings.meta_config(updates_per_epoch * optim.epochs)
    if mentor is not None and "mentor_update" not in settings.meta.fields:
        config = config.with_overrides(mentor_update=settings.iterative.iteration_mentor)
    mentor = mentor if mentor is not None else sharded_mentor
    wrapper = MetaNoiseWrapper(model, optimizer, config, mentor=mentor, accelerator=accelerator)
    source = settings.meta_config_sources()
    console.print(f"MLNT: {config}" + (f"\n  {source} defaults: {automatic}" if automatic else ""))
    if config.fast_params == "all" and wrapper.fast_suffix:
        part = "classifier" if wrapper.fast_suffix == "head" else "last stage and classifier"
        console.print(
            f"  only the {part} can change: each synthetic set runs only that part on a shared trunk "
            f"(as --fast-params {wrapper.fast_suffix})"
        )
    if settings.meta.no_meta:
        console.print("--no-meta: cross-entropy baseline (meta weight 0; the EMA mentor is still tracked)")
    return Training(wrapper, optimizer, batches, dict(zip(eval_loaders, loaders)), scheduler, augmentation)


def shard_student_and_mentor(
    accelerator: Accelerator, model: torch.nn.Module, fast_params: Any
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``--fsdp``: the student and its mentor copy on this process's device, each sharded across the processes
    with the fast weights whole (`noisy_meta.fully_shard_trunk`)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    model = model.to(accelerator.device)
    mentor = copy.deepcopy(model)  # before sharding: FSDP2 modules cannot be copied
    return fully_shard_trunk(model, fast_params, mesh), fully_shard_trunk(mentor, fast_params, mesh)


def _resume(context: RunContext, wrapper: MetaNoiseWrapper, state: RunState, output_dir: Path) -> None:
    """Load the checkpoint ``--resume`` names (or ``<output-dir>/last``) and check every rank holds it."""
    settings, accelerator = context.settings, context.accelerator
    given = settings.control.resume
    resume_dir = find_checkpoint(Path(given) if given and settings.iterative.iterations == 1 else output_dir / "last")
    check_checkpoint(resume_dir, wrapper.module)
    _check_resumed_settings(context, resume_dir)
    try:
        accelerator.load_state(str(resume_dir))
        if settings.optim.fsdp:  # the student and optimizer Accelerate does not hold
            load_sharded_training(resume_dir, wrapper.module, wrapper.optimizer)
    except Exception as error:
        raise CheckpointError(f"--resume: could not restore {resume_dir}: {error}") from error
    check_ranks_agree(accelerator, wrapper.module, wrapper.mentor)
    where = f"epoch {state.epoch + 1}, batch {state.batch + 1}" if state.batch else f"the end of epoch {state.epoch}"
    context.console.print(f"resumed from {resume_dir} at {where} (after update {wrapper.num_updates})")


def _check_resumed_settings(context: RunContext, resume_dir: Path) -> None:
    """Say which settings differ from the run that wrote ``resume_dir``; refuse those that would break it
    (`noisy_meta.finetune.flags.RESUME_BREAKING`). A checkpoint that records none is trusted."""
    recorded = read_position(resume_dir).get("flags")
    if recorded is None:
        context.console.print(f"[yellow]note:[/] {resume_dir} records no settings: resuming with the command as given")
        return
    breaking, others = resume_differences(recorded, context.settings.flags)
    if breaking:
        args_file = Path(recorded.get("output_dir") or resume_dir.parent) / ARGS_FILE
        raise CheckpointError(
            f"--resume {resume_dir}: the checkpoint's run was started with other settings that its state depends on "
            f"({'; '.join(breaking)}); give the same ones (--config {args_file} restores them) "
            "or start a new run"
        )
    if others:
        context.console.print(f"resuming with settings changed from the checkpoint's run: {'; '.join(others)}")


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
    save_checkpoint(accelerator, stopped, wrapper.module, wrapper.mentor, optimizer=wrapper.optimizer)
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


def train_iterations(context: RunContext, splits: Splits, output_dir: Path) -> dict[str, Any]:
    """MLNT's iterative training: from the second run on, the previous best mentor cleans the data and mentors.

    Each iteration is a whole run in ``<output-dir>/iteration_<k>/``; the cleaning that made
    its training set is in ``cleaning.json`` and ``pred_probs.npz`` there. The mentor judges
    the *original* training split each time. With ``--resume``, finished iterations are kept
    and the first unfinished one continues from its last checkpoint.
    """
    settings, console = context.settings, context.console
    iterations, resuming = settings.iterative.iterations, settings.control.resume is not None
    rows: list[dict[str, Any]] = []
    record: dict[str, Any] = {}
    for iteration in range(1, iterations + 1):
        run_dir = output_dir / f"iteration_{iteration}"
        console.rule(f"iteration {iteration} of {iterations}")
        train_set, mentor, report = splits.train, None, None
        if iteration > 1:
            previous = find_checkpoint(output_dir / f"iteration_{iteration - 1}" / "best") / MENTOR_FILE
            mentor = load_mentor(settings.model, splits.num_classes, previous)
            probs = predict_train_set(context, mentor, splits.train)
            train_set, report = clean_dataset(splits.train, probs, settings.iterative.cleaning, splits.num_classes)
            if context.is_main_process:
                run_dir.mkdir(parents=True, exist_ok=True)
                report.save(run_dir / CLEANING_FILE)
                save_cleanlab_inputs(run_dir / PRED_PROBS_FILE, splits.train[LABEL], probs, splits.train[INDEX])
            console.print(_cleaning_line(report, len(splits.train)))
            if len(train_set) < settings.optim.batch_size * context.accelerator.num_processes:
                raise ValueError(
                    f"cleaning before iteration {iteration} left {len(train_set)} training samples, fewer than one "
                    "batch; loosen --clean-criterion / --clean-threshold"
                )
        done = _finished_records(run_dir, settings.optim.epochs) if resuming else None
        if done is not None:
            console.print(f"iteration {iteration} finished before: kept")
            record = done
            context.tracker.finished_run(done["updates"])
        else:
            resume = resuming and (run_dir / "last").exists()
            record = _train_run(context, splits, train_set, run_dir, mentor, resume)
            # the next run prepares its own model and state
            context = dataclasses.replace(context, accelerator=make_accelerator(settings))
        rows.append({"iteration": iteration, "train_size": len(train_set), "report": report, "record": record})
    console.print(iterations_table(rows))
    return record


def _finished_records(run_dir: Path, epochs: int) -> dict[str, Any] | None:
    """The last record of an iteration whose metrics log is complete, else None."""
    log = run_dir / METRICS_FILE
    records = MetricsLog(log).read() if log.exists() else []
    return records[-1] if len(records) >= epochs and (run_dir / "best").exists() else None


def _cleaning_line(report: CleaningReport, total: int) -> str:
    detection = report.detection
    config = report.config
    line = f"cleaning ({config.criterion} {config.threshold}, {config.action}): "
    line += f"flagged {detection.num_flagged} of {total}"
    if detection.precision is not None or detection.recall is not None:
        line += (
            f"; against the clean labels precision {_percent(detection.precision)}, "
            f"recall {_percent(detection.recall)}, F1 {_percent(detection.f1)}"
        )
    return line + f"; per class after: {report.remaining_per_class}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def make_accelerator(settings: RunSettings) -> Accelerator:
    """The run's Accelerator; with several processes a collective waits at most ``--rank-timeout`` seconds.

    ``--log-with`` trackers are Accelerate's, local ones writing in ``<output-dir>/tracking/``
    (`noisy_meta.finetune.tracking`); one that is not installed is refused here.
    """
    output = settings.output
    check_trackers(output.log_with)
    accelerator = Accelerator(
        cpu=cpu_only_processes(),
        mixed_precision=settings.optim.mixed_precision,
        gradient_accumulation_steps=settings.optim.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=settings.control.rank_timeout))],
        log_with=list(output.log_with) or None,
        project_config=ProjectConfiguration(
            project_dir=str(output.output_dir), logging_dir=str(output.output_dir / TRACKING_DIR)
        ),
    )
    check_process_group(accelerator.num_processes)
    if settings.optim.fsdp and accelerator.num_processes == 1:
        raise ValueError(
            "--fsdp shards the model across processes, and this run has one: launch it with accelerate launch "
            "--num_processes N (N >= 2), or leave out --fsdp"
        )
    return accelerator


def check_process_group(num_processes: int) -> None:
    """Refuse to train when the launcher started several processes that did not form one group.

    Each would then train its own copy of the model on all the data and print everything.
    """
    launched = launched_processes()
    if launched > 1 and num_processes == 1:
        raise ValueError(
            f"launched as one of {launched} processes (WORLD_SIZE={launched}), but they did not form a process "
            "group, so each would train its own copy: launch with `accelerate launch --num_processes N` (add "
            "--multi_gpu only where there are GPUs) or torchrun, and check that MASTER_ADDR / MASTER_PORT reach "
            "every process"
        )


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 when launched plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


#: What gloo / NCCL say when a collective's peer stopped answering or went away.
_LOST_RANK_SIGNS = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "Watchdog")


def is_lost_rank(error: RuntimeError) -> bool:
    """Whether ``error`` is a collective that gave up on another rank (timeout or closed connection)."""
    return launched_processes() > 1 and any(sign in str(error) for sign in _LOST_RANK_SIGNS)


def lost_rank_message(error: RuntimeError, settings: RunSettings) -> str:
    """One line for a run that stopped because another rank died or stalled: which rank says so, and how to go on."""
    rank, world = os.environ.get("RANK", "?"), launched_processes()
    first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    last = os.path.join(settings.output.output_dir, "last")
    after = f"--resume continues from {last}/" if os.path.isdir(last) else "no checkpoint had been written yet"
    timeout = settings.control.rank_timeout
    return (
        f"rank {rank} of {world}: another rank stopped answering for --rank-timeout {timeout:g} s or went "
        f"away ({first_line}); stopping, {after}"
    )


def cpu_only_processes() -> bool:
    """Run on CPU processes (gloo) when launched with several processes on a machine with no accelerator."""
    world_size = launched_processes()
    has_accelerator = torch.cuda.is_available() or (hasattr(torch, "accelerator") and torch.accelerator.is_available())
    return world_size > 1 and not has_accelerator


def check_ranks_agree(accelerator: Accelerator, *modules: torch.nn.Module) -> None:
    """Raise on every rank unless all ranks hold bitwise the same parameters and buffers.

    Each rank sends one checksum per tensor (float64 sum and sum of squares); any difference
    names the first tensor that differs. One small all-gather: cheap enough after a resume.
    An FSDP2 module's sharded tensors hold another part on each rank: its whole ones are compared.
    """
    if accelerator.num_processes == 1:
        return
    names, sums = [], []
    for number, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            if is_dtensor(tensor):
                continue
            values = tensor.detach().double().reshape(-1)
            names.append(f"module {number}: {name}")
            sums.append(torch.stack([values.sum(), (values * values).sum()]) if values.numel() else values.new_zeros(2))
    local = torch.stack(sums).to(accelerator.device)
    gathered = accelerator.gather(local.unsqueeze(0))
    differs = (gathered != gathered[0:1]).any(dim=0).any(dim=1).nonzero().flatten().tolist()
    if differs:
        raise RuntimeError(
            f"the {accelerator.num_processes} ranks hold different weights after loading ({len(differs)} tensors "
            f"differ, first {names[differs[0]]}); the checkpoint was not loaded the same on every rank"
        )
