"""The fine-tuning run behind `examples/finetune.py`, read top to bottom.

Accelerate does devices, mixed precision and processes; `MetaNoiseWrapper` does MLNT;
Hugging Face datasets feeds the images; checkpoints are safetensors; rich shows progress.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import timm
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from rich.console import Console
from timm.data import create_transform, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader

from ..wrapper import MetaNoiseWrapper
from .checkpoint import (
    METRICS_FILE,
    MetricsLog,
    RunState,
    find_checkpoint,
    save_checkpoint,
)
from .cli import apply_data_set_defaults, build_parser, resolve_meta_config
from .data import (
    CLEAN_COLUMN,
    EMBEDDED,
    attach_transform,
    collate,
    load_image_dataset,
    prepare_splits,
)
from .progress import EpochProgress, summary_table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse flags and run; returns the last epoch's metrics record."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> dict[str, Any]:
    embedded = args.dataset == EMBEDDED
    filled = apply_data_set_defaults(args)
    accelerator = Accelerator(
        cpu=_cpu_only_processes(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    console = Console(quiet=not accelerator.is_main_process)
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
        console.print(f"[yellow]warning:[/] Accelerate runs fp16 on {accelerator.device.type} without autocast: training in fp32")
    set_seed(args.seed)
    console.print(f"defaults for {'the embedded data' if embedded else 'this data set'}: {filled}")
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- data
    noise, noise_rate = args.noise, args.noise_rate
    data = load_image_dataset(args.dataset)
    test_split = {"auto": "test" if "test" in data else None, "none": None}.get(args.test_split, args.test_split)
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
    if splits.noise is not None:
        console.print(f"label noise: {noise}, rate {noise_rate:.2f} requested, {splits.noise.realised_rate:.4f} realised")
    console.print(
        f"train {len(splits.train)}, validation {len(splits.validation)} (scored against "
        f"{'clean' if splits.validation_is_clean else 'the given'} labels), "
        f"test {len(splits.test) if splits.test is not None else 0}; {splits.num_classes} classes"
    )

    # ---------------------------------------------------------------- model, optimizer, schedule
    model = _create_model(args, splits.num_classes)
    size = args.img_size
    data_config = resolve_data_config({"input_size": (3, size, size)} if size else {}, model=model)
    train_transform = create_transform(
        **data_config, is_training=True, no_aug=args.no_aug, hflip=args.hflip, scale=tuple(args.scale)
    )
    eval_transform = create_transform(**data_config, is_training=False)
    train_loader = DataLoader(
        attach_transform(splits.train, train_transform), batch_size=args.batch_size, shuffle=True,
        drop_last=True, collate_fn=collate, num_workers=args.workers,
    )
    eval_loaders = {
        name: DataLoader(attach_transform(split, eval_transform), batch_size=2 * args.batch_size, collate_fn=collate, num_workers=args.workers)
        for name, split in (("val", splits.validation), ("test", splits.test)) if split is not None
    }
    if len(train_loader) == 0:
        raise ValueError(f"the training split ({len(splits.train)} samples) is smaller than one batch ({args.batch_size})")
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
    wrapper = MetaNoiseWrapper(model, optimizer, config, accelerator=accelerator)
    console.print(f"MLNT: {config}" + (f"\n  run-length defaults: {automatic}" if automatic else ""))
    if args.no_meta:
        console.print("--no-meta: cross-entropy baseline (meta weight 0)")

    # ---------------------------------------------------------------- checkpoint state and resume
    state = RunState()
    accelerator.register_for_checkpointing(wrapper, state, *([scheduler] if scheduler is not None else []))
    log = MetricsLog(output_dir / METRICS_FILE)
    if args.resume is not None:
        resume_dir = find_checkpoint(Path(args.resume) if args.resume else output_dir / "last")
        accelerator.load_state(str(resume_dir))
        console.print(f"resumed from {resume_dir} after epoch {state.epoch}")
    if accelerator.is_main_process:
        log.truncate(state.epoch)  # a fresh run starts an empty log; a resumed one drops later epochs
    accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- train
    progress = EpochProgress(console, enabled=accelerator.is_main_process)
    record: dict[str, Any] = {}
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
            for key in totals:
                totals[key] += stats[key]
            progress.update(stats, batch["label"].shape[0] * accelerator.num_processes)
        progress.stop()
        if scheduler is not None:
            scheduler.step(epoch + 1)

        accuracy = {name: _evaluate(accelerator, wrapper, loader) for name, loader in eval_loaders.items()}
        record = {
            "epoch": epoch,
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
        console.print(summary_table(log.read(), state.best_epoch))
        console.print(f"checkpoints and metrics in {output_dir}/ (last/, best/, {METRICS_FILE})")
    accelerator.end_training()
    return record


def _cpu_only_processes() -> bool:
    """Run on CPU processes (gloo) when launched with several processes on a machine with no accelerator."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    has_accelerator = torch.cuda.is_available() or (hasattr(torch, "accelerator") and torch.accelerator.is_available())
    return world_size > 1 and not has_accelerator


def _create_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    if args.checkpoint is not None:
        if not os.path.isfile(args.checkpoint):
            raise FileNotFoundError(f"--checkpoint: no file at {args.checkpoint}")
        # As pretrained weights from a local file: timm replaces a classifier of another size.
        return timm.create_model(
            args.model, pretrained=True, num_classes=num_classes,
            pretrained_cfg_overlay={"file": os.path.abspath(args.checkpoint)},
        )
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
