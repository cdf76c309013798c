"""The fine-tuning run behind `examples/finetune.py`, read top to bottom.

Accelerate does devices, mixed precision and processes; `MetaNoiseWrapper` does MLNT;
Hugging Face datasets feeds the images; checkpoints are safetensors; rich shows progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from datasets import Dataset, DatasetDict
from rich.console import Console
from timm.data import create_transform, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader

from ..cleaning import (
    CleaningConfig,
    CleaningReport,
    clean_dataset,
    save_cleanlab_inputs,
)
from ..noisy_datasets import INDEX, LABEL
from ..wrapper import MetaNoiseWrapper
from .checkpoint import (
    BAD_IMAGES_FILE,
    CLEANING_FILE,
    MENTOR_FILE,
    METRICS_FILE,
    PRED_PROBS_FILE,
    CheckpointError,
    MetricsLog,
    RunState,
    check_body_weights,
    check_checkpoint,
    find_checkpoint,
    read_weights,
    save_checkpoint,
)
from .cli import (
    apply_data_set_defaults,
    build_parser,
    cleaning_config,
    resolve_meta_config,
)
from .data import (
    CLEAN_COLUMN,
    EMBEDDED,
    Splits,
    attach_transform,
    collate,
    drop_bad_images,
    find_bad_images,
    load_image_dataset,
    prepare_splits,
)
from .progress import EpochProgress, iterations_table, summary_table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse flags and run; returns the last epoch's metrics record."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One training run, or ``--iterations K`` runs with data cleaning in between."""
    embedded = args.dataset == EMBEDDED
    filled = apply_data_set_defaults(args)
    cleaning = cleaning_config(args)
    accelerator = _accelerator(args)
    console = Console(quiet=not accelerator.is_main_process)
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
        console.print(f"[yellow]warning:[/] Accelerate runs fp16 on {accelerator.device.type} without autocast: training in fp32")
    set_seed(args.seed)
    console.print(f"defaults for {'the embedded data' if embedded else 'this data set'}: {filled}")
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    splits = _load_splits(args, console, accelerator.is_main_process)
    if args.iterations == 1:
        record = _train_run(args, accelerator, console, splits, splits.train, output_dir)
    else:
        record = _train_iterations(args, accelerator, console, splits, cleaning, output_dir)
    if args.export_pred_probs:
        final_dir = output_dir if args.iterations == 1 else output_dir / f"iteration_{args.iterations}"
        mentor = _load_mentor(args, splits.num_classes, find_checkpoint(final_dir / "best") / MENTOR_FILE)
        probs = _predict_train_set(accelerator, args, mentor, splits.train)
        if accelerator.is_main_process:
            save_cleanlab_inputs(output_dir / PRED_PROBS_FILE, splits.train[LABEL], probs, splits.train[INDEX])
            console.print(f"best mentor's training-set probabilities for cleanlab: {output_dir / PRED_PROBS_FILE}")
    accelerator.end_training()
    return record


def _accelerator(args: argparse.Namespace) -> Accelerator:
    return Accelerator(
        cpu=_cpu_only_processes(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def _load_splits(args: argparse.Namespace, console: Console, main_process: bool) -> Splits:
    noise, noise_rate = args.noise, args.noise_rate
    data = load_image_dataset(args.dataset)
    test_split = {"auto": "test" if "test" in data else None, "none": None}.get(args.test_split, args.test_split)
    names = [s for s in (args.train_split, args.val_split, test_split) if s in data]
    data = _handle_bad_images(args, console, data, names, main_process)
    splits = prepare_splits(
        data,
        train_split=args.train_split,
        val_split=args.val_split,
        test_split=test_split,
        image_column=args.image_column,
        label_column=args.label_column,
        clean_label_column=args.clean_label_column,
        num_classes=args.num_classes,
        noise=noise,
        noise_rate=noise_rate,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    counts = np.bincount(np.asarray(splits.train[LABEL], dtype=np.int64), minlength=splits.num_classes)
    empty = np.flatnonzero(counts == 0).tolist()
    if empty:
        console.print(
            f"[yellow]warning:[/] {len(empty)} of {splits.num_classes} classes have no training sample "
            f"(classes {empty[:20]}{' ...' if len(empty) > 20 else ''}): the model can never learn them; "
            "check --num-classes and the label column"
        )
    if splits.noise is not None:
        console.print(f"label noise: {noise}, rate {noise_rate:.2f} requested, {splits.noise.realised_rate:.4f} realised")
    console.print(
        f"train {len(splits.train)}, validation {len(splits.validation)} (scored against "
        f"{'clean' if splits.validation_is_clean else 'the given'} labels), "
        f"test {len(splits.test) if splits.test is not None else 0}; {splits.num_classes} classes"
    )
    return splits


def _handle_bad_images(
    args: argparse.Namespace, console: Console, data: DatasetDict, names: list[str], main_process: bool
) -> DatasetDict:
    """Scan the splits used for images that do not decode; refuse them, or drop them counted and listed.

    Runs on the data as loaded, before noise injection (instance noise decodes every image).
    """
    if args.bad_images == "unchecked":
        return data
    bad = [b for name in names for b in find_bad_images(data[name], name, args.image_column)]
    if not bad:
        return data
    listing = "; ".join(f"{b.split} sample {b.index} ({b.path or 'in memory'}): {b.error}" for b in bad[:5])
    if args.bad_images == "refuse":
        raise ValueError(
            f"{len(bad)} image(s) do not decode: {listing}{' ...' if len(bad) > 5 else ''}. Fix or remove the "
            "files, or pass --bad-images skip to train without them (they are counted and listed)"
        )
    output_dir = Path(args.output_dir)
    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / BAD_IMAGES_FILE).write_text(json.dumps([dataclasses.asdict(b) for b in bad], indent=1) + "\n")
    console.print(f"[yellow]skipped {len(bad)} image(s) that do not decode[/] (listed in {output_dir / BAD_IMAGES_FILE}): {listing}")
    cleaned = DatasetDict(data)
    for name in names:
        cleaned[name] = drop_bad_images(data[name], [b for b in bad if b.split == name])
    return cleaned


def _train_iterations(
    args: argparse.Namespace, accelerator: Accelerator, console: Console, splits: Splits, cleaning: CleaningConfig, output_dir: Path
) -> dict[str, Any]:
    """MLNT's iterative training: from the second run on, the previous best mentor cleans the data and mentors.

    Each iteration is a whole run in ``<output-dir>/iteration_<k>/``; the cleaning that made
    its training set is in ``cleaning.json`` and ``pred_probs.npz`` there. The mentor judges
    the *original* training split each time. With ``--resume``, finished iterations are kept
    and the first unfinished one continues from its last checkpoint.
    """
    rows: list[dict[str, Any]] = []
    record: dict[str, Any] = {}
    for iteration in range(1, args.iterations + 1):
        run_dir = output_dir / f"iteration_{iteration}"
        console.rule(f"iteration {iteration} of {args.iterations}")
        train_set, mentor, report = splits.train, None, None
        if iteration > 1:
            previous = find_checkpoint(output_dir / f"iteration_{iteration - 1}" / "best") / MENTOR_FILE
            mentor = _load_mentor(args, splits.num_classes, previous)
            probs = _predict_train_set(accelerator, args, mentor, splits.train)
            train_set, report = clean_dataset(splits.train, probs, cleaning, splits.num_classes)
            if accelerator.is_main_process:
                run_dir.mkdir(parents=True, exist_ok=True)
                report.save(run_dir / CLEANING_FILE)
                save_cleanlab_inputs(run_dir / PRED_PROBS_FILE, splits.train[LABEL], probs, splits.train[INDEX])
            console.print(_cleaning_line(report, len(splits.train)))
            if len(train_set) < args.batch_size * accelerator.num_processes:
                raise ValueError(
                    f"cleaning before iteration {iteration} left {len(train_set)} training samples, fewer than one "
                    "batch; loosen --clean-criterion / --clean-threshold"
                )
        done = _finished_records(run_dir, args.epochs) if args.resume is not None else None
        if done is not None:
            console.print(f"iteration {iteration} finished before: kept")
            record = done
        else:
            resume = args.resume is not None and (run_dir / "last").exists()
            record = _train_run(args, accelerator, console, splits, train_set, run_dir, mentor, resume)
            accelerator = _accelerator(args)  # the next run prepares its own model and state
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
    line = f"cleaning ({report.config.criterion} {report.config.threshold}, {report.config.action}): flagged {detection.num_flagged} of {total}"
    if detection.precision is not None or detection.recall is not None:
        line += f"; against the clean labels precision {_percent(detection.precision)}, recall {_percent(detection.recall)}, F1 {_percent(detection.f1)}"
    return line + f"; per class after: {report.remaining_per_class}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


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
    # ---------------------------------------------------------------- model, data, optimizer, schedule
    model = _create_model(args, splits.num_classes)
    train_transform, eval_transform = _transforms(args, model)
    train_loader = DataLoader(
        attach_transform(train_set, train_transform), batch_size=args.batch_size, shuffle=True,
        drop_last=True, collate_fn=collate, num_workers=args.workers,
    )
    eval_loaders = {
        name: DataLoader(attach_transform(split, eval_transform), batch_size=2 * args.batch_size, collate_fn=collate, num_workers=args.workers)
        for name, split in (("val", splits.validation), ("test", splits.test)) if split is not None
    }
    if len(train_loader) == 0:
        raise ValueError(f"the training split ({len(train_set)} samples) is smaller than one batch ({args.batch_size})")
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum)
    model, optimizer, train_loader, *loaders = accelerator.prepare(model, optimizer, train_loader, *eval_loaders.values())
    eval_loaders = dict(zip(eval_loaders, loaders))
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)  # the last window syncs early
    scheduler = None
    if args.sched != "none":
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
            updates_per_epoch=updates_per_epoch,
        )

    # ---------------------------------------------------------------- MLNT
    config, automatic = resolve_meta_config(args, updates_per_epoch * args.epochs)
    if mentor is not None and args.meta_mentor_update is None:
        config = config.with_overrides(mentor_update=args.iteration_mentor)
    wrapper = MetaNoiseWrapper(model, optimizer, config, mentor=mentor, accelerator=accelerator)
    console.print(f"MLNT: {config}" + (f"\n  run-length defaults: {automatic}" if automatic else ""))
    if args.no_meta:
        console.print("--no-meta: cross-entropy baseline (meta weight 0; the EMA mentor is still tracked)")

    # ---------------------------------------------------------------- checkpoint state and resume
    state = RunState()
    accelerator.register_for_checkpointing(wrapper, state, *([scheduler] if scheduler is not None else []))
    log = MetricsLog(output_dir / METRICS_FILE)
    if resume is None:
        resume = args.resume is not None
    if resume:
        resume_dir = find_checkpoint(Path(args.resume) if args.resume and args.iterations == 1 else output_dir / "last")
        check_checkpoint(resume_dir, accelerator.unwrap_model(model))
        try:
            accelerator.load_state(str(resume_dir))
        except Exception as error:
            raise CheckpointError(f"--resume: could not restore {resume_dir}: {error}") from error
        check_ranks_agree(accelerator, wrapper.module, wrapper.mentor)
        console.print(f"resumed from {resume_dir} after epoch {state.epoch}")
    if accelerator.is_main_process:
        log.truncate(state.epoch)  # a fresh run starts an empty log; a resumed one drops later epochs
    accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- train
    progress = EpochProgress(console, enabled=accelerator.is_main_process)
    record: dict[str, Any] = {}
    consecutive_skips = 0
    for epoch in range(state.epoch, args.epochs):
        train_loader.set_epoch(epoch)
        wrapper.module.train()
        started = time.perf_counter()
        progress.start(epoch, args.epochs, len(train_loader))
        totals = {"loss": 0.0, "ce_loss": 0.0, "meta_loss": 0.0, "labels_changed": 0.0}
        for batch in train_loader:
            with accelerator.accumulate(model):
                stats = wrapper.step(batch["pixel_values"], batch["label"])
            if scheduler is not None and accelerator.sync_gradients:
                scheduler.step_update(num_updates=wrapper.num_updates)
            if accelerator.sync_gradients:  # every rank sees the same skip decision
                consecutive_skips = consecutive_skips + 1 if stats["skipped"] else 0
                if args.max_consecutive_skips and consecutive_skips >= args.max_consecutive_skips:
                    progress.stop()
                    _stop_after_skips(accelerator, wrapper, output_dir, consecutive_skips, epoch)
            for key in totals:
                totals[key] += stats[key]
            progress.update(stats, batch["label"].shape[0] * accelerator.num_processes)
        progress.stop()
        if scheduler is not None:
            scheduler.step(epoch + 1)

        accuracy = {name: _evaluate(accelerator, wrapper, loader) for name, loader in eval_loaders.items()}
        record = {
            "epoch": epoch,
            "train_samples": len(train_set),
            **{f"train_{key}": value / len(train_loader) for key, value in totals.items()},
            "meta_weight": stats["meta_weight"],
            "updates": wrapper.num_updates,
            "num_skipped": wrapper.num_skipped,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
            "images_per_second": progress.throughput,
            **{f"{split}_{who}": value for split, result in accuracy.items() for who, value in result.items()},
        }
        console.print(_epoch_line(record))
        if accelerator.is_main_process:  # before the checkpoint: a resume drops records it has not reached
            log.append(record)
        score = max(record["val_student"], record["val_mentor"])
        state.epoch = epoch + 1
        if score > state.best_score:
            state.best_score, state.best_epoch = score, epoch
            save_checkpoint(accelerator, output_dir / "best", wrapper.module, wrapper.mentor)
        save_checkpoint(accelerator, output_dir / "last", wrapper.module, wrapper.mentor)

    if accelerator.is_main_process:
        records = log.read()
        console.print(summary_table(records, state.best_epoch))
        console.print(f"checkpoints and metrics in {output_dir}/ (last/, best/, {METRICS_FILE})")
        record = records[-1] if records else record
    return record


def check_ranks_agree(accelerator: Accelerator, *modules: torch.nn.Module) -> None:
    """Raise on every rank unless all ranks hold bitwise the same parameters and buffers.

    Each rank sends one checksum per tensor (float64 sum and sum of squares); any difference
    names the first tensor that differs. One small all-gather: cheap enough after a resume.
    """
    if accelerator.num_processes == 1:
        return
    names, sums = [], []
    for number, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
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


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive updates were skipped because the loss or a gradient was not finite."""


def _stop_after_skips(accelerator: Accelerator, wrapper: MetaNoiseWrapper, output_dir: Path, skips: int, epoch: int) -> None:
    """Save the last good state in ``<output-dir>/stopped/`` and stop the run.

    Skipped updates leave parameters, optimizer state and mentor untouched, so the state now
    is the one after the last good update. ``last/`` keeps the previous epoch's checkpoint,
    from which ``--resume`` continues exactly.
    """
    stopped = output_dir / "stopped"
    save_checkpoint(accelerator, stopped, wrapper.module, wrapper.mentor)
    raise NonFiniteTrainingError(
        f"{skips} consecutive updates were skipped because the loss or a gradient was not finite "
        f"(epoch {epoch + 1}, after {wrapper.num_updates} good updates; {wrapper.num_skipped} skipped in all). "
        f"The last good weights are in {stopped}/ and {output_dir / 'last'}/ holds the end of the previous epoch. "
        "Lower --lr or --inner-lr, add --clip-grad, look for non-finite inputs, or use bf16 rather than fp16; "
        "--max-consecutive-skips sets the limit (0: never stop)."
    )


def _transforms(args: argparse.Namespace, model: torch.nn.Module) -> tuple[Any, Any]:
    size = args.img_size
    data_config = resolve_data_config({"input_size": (3, size, size)} if size else {}, model=model)
    train_transform = create_transform(
        **data_config, is_training=True, no_aug=args.no_aug, hflip=args.hflip, scale=tuple(args.scale)
    )
    return train_transform, create_transform(**data_config, is_training=False)


def _load_mentor(args: argparse.Namespace, num_classes: int, path: Path) -> torch.nn.Module:
    """A mentor saved by an earlier run (``mentor.safetensors``), on CPU."""
    mentor = timm.create_model(args.model, num_classes=num_classes)
    mentor.load_state_dict(read_weights(path, mentor, "the previous iteration's best mentor"))
    return mentor


def _predict_train_set(accelerator: Accelerator, args: argparse.Namespace, mentor: torch.nn.Module, train_set: Dataset) -> np.ndarray:
    """The mentor's probabilities ``[N, K]`` for every training sample, in row order, on every rank."""
    _, eval_transform = _transforms(args, mentor)
    loader = accelerator.prepare_data_loader(
        DataLoader(attach_transform(train_set, eval_transform), batch_size=2 * args.batch_size, collate_fn=collate, num_workers=args.workers)
    )
    mentor = mentor.to(accelerator.device).eval()
    probs, indices = [], []
    with torch.no_grad():
        for batch in loader:
            with accelerator.autocast():
                logits = mentor(batch["pixel_values"])
            gathered = accelerator.gather_for_metrics((torch.softmax(logits.float(), dim=1), batch["index"]))
            probs.append(gathered[0].double().cpu())
            indices.append(gathered[1].cpu())
    gathered_probs, gathered_index = torch.cat(probs).numpy(), torch.cat(indices).numpy()
    positions = np.asarray(train_set[INDEX])
    row_of = {int(index): row for row, index in enumerate(positions)}
    result = np.empty((len(positions), gathered_probs.shape[1]))
    result[[row_of[int(index)] for index in gathered_index]] = gathered_probs
    return result


def _cpu_only_processes() -> bool:
    """Run on CPU processes (gloo) when launched with several processes on a machine with no accelerator."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    has_accelerator = torch.cuda.is_available() or (hasattr(torch, "accelerator") and torch.accelerator.is_available())
    return world_size > 1 and not has_accelerator


def _create_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    if args.checkpoint is not None:
        if not os.path.isfile(args.checkpoint):
            raise FileNotFoundError(f"--checkpoint: no file at {args.checkpoint}")
        path = os.path.abspath(args.checkpoint)
        check_body_weights(path, timm.create_model(args.model, num_classes=num_classes), f"--model {args.model}")
        # As pretrained weights from a local file: timm replaces a classifier of another size.
        return timm.create_model(args.model, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay={"file": path})
    return timm.create_model(args.model, pretrained=args.pretrained, num_classes=num_classes)


@torch.no_grad()
def _evaluate(accelerator: Accelerator, wrapper: MetaNoiseWrapper, loader: DataLoader) -> dict[str, float]:
    """Accuracy of student and mentor against the clean label where known, else the given label."""
    student, mentor = wrapper.module, wrapper.mentor
    student.eval()
    correct = {"student": 0, "mentor": 0}
    total = 0
    for batch in loader:
        target = torch.where(batch[CLEAN_COLUMN] >= 0, batch[CLEAN_COLUMN], batch["label"])
        with accelerator.autocast():
            hits = {name: model(batch["pixel_values"]).argmax(dim=1) == target for name, model in (("student", student), ("mentor", mentor))}
        for name, hit in hits.items():
            correct[name] += int(accelerator.gather_for_metrics(hit).sum())
        total += int(accelerator.gather_for_metrics(target).numel())
    student.train()
    return {name: count / max(total, 1) for name, count in correct.items()}


def _epoch_line(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch'] + 1}", f"loss {record['train_loss']:.3f}", f"w {record['meta_weight']:.2f}"]
    for split in ("val", "test"):
        if f"{split}_student" in record:
            parts.append(f"{split} student {100 * record[f'{split}_student']:.2f}% mentor {100 * record[f'{split}_mentor']:.2f}%")
    parts.append(f"{record['images_per_second']:.0f} img/s")
    return " | ".join(parts)
