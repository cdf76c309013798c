"""The fine-tuning run behind `examples/finetune.py`, read top to bottom.

Accelerate does devices, mixed precision and processes; `MetaNoiseWrapper` does MLNT;
Hugging Face datasets feeds the images; checkpoints are safetensors; rich shows progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import Dataset, IterableDataset
from rich.console import Console
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader

from ..labels.cleaning import save_cleanlab_inputs
from ..labels.noisy_datasets import INDEX, LABEL
from ..wrapper import MetaNoiseWrapper
from .checkpoint import CheckpointError, check_checkpoint, find_checkpoint
from .clean_before import clean_before_training
from .cli import build_parser, clean_before_action, cleaning_config, preset_name, resolve_meta_config, validate_args
from .data import (
    EMBEDDED,
    Splits,
    attach_transform,
    collate,
)
from .distributed import check_ranks_agree, make_accelerator
from .flag_checks import previous_run
from .iterative import train_iterations
from .models import create_model, load_mentor, transforms
from .names import MENTOR_FILE, METRICS_FILE, PRED_PROBS_FILE
from .preemption import StopSignals
from .progress import EpochProgress, summary_table
from .run_checkpoints import RunCheckpoints
from .run_data import load_splits
from .run_state import MetricsLog, RunState
from .seeded_augmentation import SeededAugmentation
from .stream import StreamLoader
from .train_loop import TRAIN_STATS, epoch_line, predict_train_set, train_one_epoch, validate

__all__ = ["main", "run"]

#: Columns of the output when it is not a terminal (a scheduler's log file): rich's default of
#: 80 would cut the progress line and wrap messages.
LOG_WIDTH = 160


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse flags and run; returns the last epoch's metrics record."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One training run, or ``--iterations K`` runs with data cleaning in between."""
    embedded = args.dataset == EMBEDDED
    filled = validate_args(args)
    cleaning = cleaning_config(args)
    accelerator = make_accelerator(args)
    console = Console(quiet=not accelerator.is_main_process, width=None if sys.stdout.isatty() else LOG_WIDTH)
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
        console.print(
            f"[yellow]warning:[/] Accelerate runs fp16 on {accelerator.device.type} without autocast: training in fp32"
        )
    set_seed(args.seed)
    console.print(f"defaults for {'the embedded data' if embedded else 'this data set'}: {filled}")
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        if args.overwrite:
            _remove_previous_run(console, output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    splits = load_splits(args, console, accelerator)
    action = clean_before_action(args)
    if action != "off":  # every rank flags the same images (same weights, a deterministic search)
        cleaned = clean_before_training(args, accelerator, console, splits.train, splits.num_classes, output_dir)
        splits = dataclasses.replace(splits, train=cleaned)
    if args.iterations == 1:
        record = _train_run(args, accelerator, console, splits, splits.train, output_dir)
    else:
        record = train_iterations(args, accelerator, console, splits, cleaning, output_dir, _train_run)
    if args.export_pred_probs:
        final_dir = output_dir if args.iterations == 1 else output_dir / f"iteration_{args.iterations}"
        mentor = load_mentor(args, splits.num_classes, find_checkpoint(final_dir / "best") / MENTOR_FILE)
        probs = predict_train_set(accelerator, args, mentor, splits.train)
        if accelerator.is_main_process:
            save_cleanlab_inputs(output_dir / PRED_PROBS_FILE, splits.train[LABEL], probs, splits.train[INDEX])
            console.print(f"best mentor's training-set probabilities for cleanlab: {output_dir / PRED_PROBS_FILE}")
    accelerator.wait_for_everyone()  # every rank done (the main one wrote the summary) before the group goes
    accelerator.end_training()
    return record


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
    train_loader: DataLoader | StreamLoader
    eval_loaders: dict[str, DataLoader]
    scheduler: Any | None
    augmentation: SeededAugmentation


def _train_run(
    args: argparse.Namespace,
    accelerator: Accelerator,
    console: Console,
    splits: Splits,
    train_set: Dataset,
    output_dir: Path,
    mentor: torch.nn.Module | None = None,
    resume: bool | None = None,
) -> dict[str, Any]:
    """One whole training run into ``output_dir``; returns the last epoch's metrics record.

    ``mentor`` (iterative training) is used as the mentor from the start, with
    ``--iteration-mentor`` deciding whether it keeps averaging the student.
    """
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    training = _prepare(args, accelerator, console, splits, train_set, mentor)
    wrapper = training.wrapper
    state = RunState(args.max_consecutive_skips)
    accelerator.register_for_checkpointing(wrapper, state, *filter(None, [training.scheduler]))
    if args.resume is not None if resume is None else resume:
        _resume(args, accelerator, console, wrapper, state, output_dir)
    log = MetricsLog(output_dir / METRICS_FILE)
    if accelerator.is_main_process:
        log.truncate(state.epoch)  # a fresh run starts an empty log; a resumed one drops later epochs
    accelerator.wait_for_everyone()

    progress = EpochProgress(console, enabled=accelerator.is_main_process, log_interval=args.log_interval)
    record: dict[str, Any] = {}
    with StopSignals() as signals:
        checkpoints = RunCheckpoints(
            accelerator, wrapper, state, output_dir, args.checkpoint_every, args.keep_checkpoints, signals
        )
        for epoch in range(state.epoch, args.epochs):
            training.train_loader.set_epoch(epoch)
            training.augmentation.epoch = epoch
            started = time.perf_counter()
            progress.start(epoch, args.epochs, len(training.train_loader), done=state.batch)
            train_stats = train_one_epoch(
                epoch, wrapper, training.train_loader, accelerator, training.scheduler, progress, state, checkpoints
            )
            if training.scheduler is not None:
                training.scheduler.step(epoch + 1)
            accuracy = {name: validate(accelerator, wrapper, loader) for name, loader in training.eval_loaders.items()}
            record = {
                "epoch": epoch + 1,  # epochs done, as the table and the progress count them
                "train_samples": _train_size(training.train_loader, train_set),
                **_training_record(training, train_stats, progress.throughput, time.perf_counter() - started),
                **{f"{split}_{who}": value for split, result in accuracy.items() for who, value in result.items()},
            }
            console.print(epoch_line(record))
            if accelerator.is_main_process:  # before the checkpoint: a resume drops records it has not reached
                log.append(record)
            checkpoints.after_epoch(record, final=epoch + 1 == args.epochs)

    if accelerator.is_main_process:
        records = log.read()
        console.print(summary_table(records, state.best_epoch))
        console.print(f"checkpoints and metrics in {output_dir}/ (last/, best/, {METRICS_FILE})")
        record = records[-1] if records else record
    return record


def _training_record(training: Training, stats: dict[str, float], throughput: float, seconds: float) -> dict[str, Any]:
    """An epoch's training figures, as ``metrics.jsonl`` records them."""
    wrapper = training.wrapper
    return {
        **{f"train_{key}": stats[key] for key in TRAIN_STATS},
        "meta_weight": stats["meta_weight"],
        "updates": wrapper.num_updates,
        "num_skipped": wrapper.num_skipped,
        "lr": training.optimizer.param_groups[0]["lr"],
        "seconds": seconds,
        "images_per_second": throughput,
    }


def _prepare(
    args: argparse.Namespace,
    accelerator: Accelerator,
    console: Console,
    splits: Splits,
    train_set: Dataset,
    mentor: torch.nn.Module | None,
) -> Training:
    """Model, loaders, optimizer and schedule prepared by Accelerate, and the MLNT wrapper around them."""
    model = create_model(args, splits.num_classes)
    train_transform, eval_transform = transforms(args, model)
    augmentation = SeededAugmentation(train_transform, args.seed)
    train_loader = _train_loader(args, accelerator, splits, train_set, augmentation)
    eval_loaders = {
        name: DataLoader(
            attach_transform(split, eval_transform),
            batch_size=2 * args.batch_size,
            collate_fn=collate,
            num_workers=args.workers,
        )
        for name, split in (("val", splits.validation), ("test", splits.test))
        if split is not None
    }
    if len(train_loader) == 0:
        raise ValueError(
            f"the training split ({_train_size(train_loader, train_set)} samples) is smaller than one batch "
            f"({args.batch_size}) per process"
        )
    optimizer = create_optimizer_v2(
        model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum
    )
    if isinstance(train_loader, StreamLoader):  # each rank reads its own shards: not Accelerate's to split
        model, optimizer, *loaders = accelerator.prepare(model, optimizer, *eval_loaders.values())
    else:
        model, optimizer, train_loader, *loaders = accelerator.prepare(
            model, optimizer, train_loader, *eval_loaders.values()
        )
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)  # the last window syncs early
    scheduler = None
    if args.sched != "none":
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=args.sched,
            num_epochs=args.epochs,
            warmup_epochs=args.warmup_epochs,
            updates_per_epoch=updates_per_epoch,
        )
    config, automatic = resolve_meta_config(args, updates_per_epoch * args.epochs)
    if mentor is not None and args.meta_mentor_update is None:
        config = config.with_overrides(mentor_update=args.iteration_mentor)
    wrapper = MetaNoiseWrapper(model, optimizer, config, mentor=mentor, accelerator=accelerator)
    sources = ["run-length"]
    preset = preset_name(args)
    if (args.pretrained or args.checkpoint) and preset != "finetune":
        sources.append("fine-tuning")
    if preset != "full":
        sources.append(f"--preset {preset}")
    source = ", ".join(sources)
    console.print(f"MLNT: {config}" + (f"\n  {source} defaults: {automatic}" if automatic else ""))
    if config.fast_params == "all" and wrapper.fast_suffix:
        part = "classifier" if wrapper.fast_suffix == "head" else "last stage and classifier"
        console.print(
            f"  only the {part} can change: each synthetic set runs only that part on a shared trunk "
            f"(as --fast-params {wrapper.fast_suffix})"
        )
    if args.no_meta:
        console.print("--no-meta: cross-entropy baseline (meta weight 0; the EMA mentor is still tracked)")
    return Training(wrapper, optimizer, train_loader, dict(zip(eval_loaders, loaders)), scheduler, augmentation)


def _train_loader(
    args: argparse.Namespace,
    accelerator: Accelerator,
    splits: Splits,
    train_set: Dataset | IterableDataset,
    augmentation: SeededAugmentation,
) -> DataLoader | StreamLoader:
    """The training batches: a shuffled `DataLoader`, or with ``--streaming`` this rank's `StreamLoader`."""
    if isinstance(train_set, IterableDataset):
        return StreamLoader(
            train_set,
            splits.train_rows,
            augmentation,
            args.batch_size,
            args.seed,
            args.shuffle_buffer,
            accelerator,
            args.image_column,
            args.label_column,
            args.clean_label_column,
        )
    return DataLoader(
        attach_transform(train_set, augmentation),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        num_workers=args.workers,
        # The order comes from --seed and the epoch (Accelerate's seedable sampler), the crops from
        # `augmentation`; a generator of its own keeps the loader's draw of a worker seed off the
        # global RNG, which a run resumed mid-epoch restores exactly.
        generator=torch.Generator(),
    )


def _train_size(loader: DataLoader | StreamLoader, train_set: Dataset | IterableDataset) -> int:
    return loader.rows if isinstance(loader, StreamLoader) else len(train_set)


def _resume(
    args: argparse.Namespace,
    accelerator: Accelerator,
    console: Console,
    wrapper: MetaNoiseWrapper,
    state: RunState,
    output_dir: Path,
) -> None:
    """Load the checkpoint ``--resume`` names (or ``<output-dir>/last``) and check every rank holds it."""
    resume_dir = find_checkpoint(Path(args.resume) if args.resume and args.iterations == 1 else output_dir / "last")
    check_checkpoint(resume_dir, wrapper.module)
    try:
        accelerator.load_state(str(resume_dir))
    except Exception as error:
        raise CheckpointError(f"--resume: could not restore {resume_dir}: {error}") from error
    check_ranks_agree(accelerator, wrapper.module, wrapper.mentor)
    where = f"epoch {state.epoch + 1}, batch {state.batch + 1}" if state.batch else f"the end of epoch {state.epoch}"
    console.print(f"resumed from {resume_dir} at {where} (after update {wrapper.num_updates})")
