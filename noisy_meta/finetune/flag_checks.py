"""Checks of the command line's flags that run before any data or model is loaded.

Value types (`positive_int`, `probability`, ...) make argparse refuse a bad value with the flag
named; `check_settings` refuses combinations, paths that do not exist and an output directory
that already holds a run. Each raises ``ValueError`` (``argparse.ArgumentTypeError`` for the
types) with one line naming the flag, the value and what is allowed. No heavy imports.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..labels.noise import OPEN_SET
from .names import (
    ARGS_FILE,
    BAD_IMAGES_FILE,
    EMBEDDED,
    HISTORY_DIR,
    LABEL_ISSUES_FILE,
    LABEL_ISSUES_PICTURE,
    METRICS_FILE,
    PRED_PROBS_FILE,
    REPORT_FILE,
    TRACKING_DIR,
)

if TYPE_CHECKING:
    from .settings import RunSettings

#: What a finished or partial run leaves in its output directory (``--overwrite`` removes these).
RUN_ARTEFACTS = (
    "last",
    "best",
    "stopped",
    HISTORY_DIR,
    METRICS_FILE,
    PRED_PROBS_FILE,
    BAD_IMAGES_FILE,
    ARGS_FILE,
    REPORT_FILE,
    LABEL_ISSUES_FILE,
    LABEL_ISSUES_PICTURE,
    TRACKING_DIR,
)
_ITERATION_DIRS = "iteration_*"


def _number(text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        kind_name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {kind_name}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def switch_or(*names: str) -> Callable[[str], bool | str]:
    """The parser of a switch that also takes named values: one of ``names``, or true / false
    (what a ``--config`` file's booleans arrive as)."""

    def parse(text: str) -> bool | str:
        value = text.strip().lower()
        if value in names:
            return value
        if value in ("true", "false"):
            return value == "true"
        raise argparse.ArgumentTypeError(f"takes {' or '.join(names)} (or nothing, for true), got {text!r}")

    return parse


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def open_fraction(text: str) -> float:
    value = _number(text, float)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def smoothing_fraction(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def half_open_unit(text: str) -> float:
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def check_settings(settings: RunSettings) -> None:
    """Refuse conflicting flags, missing paths and an output directory holding a run (ValueError)."""
    _check_combinations(settings)
    _check_streaming(settings)
    _check_paths(settings)
    _check_output_dir(settings)


def _check_combinations(settings: RunSettings) -> None:
    model, noise, optim, control = settings.model, settings.noise, settings.optim, settings.control
    low, high = settings.data.scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"--scale {low} {high}: needs 0 < low <= high <= 1")
    if noise.kind == OPEN_SET and not noise.open_set_classes:
        raise ValueError(f"--noise {OPEN_SET} needs --open-set-classes (the classes whose images are the outside pool)")
    if noise.kind == OPEN_SET and noise.rate >= 1.0:
        raise ValueError(f"--noise {OPEN_SET} needs --noise-rate below 1 (some images must stay in the label space)")
    if noise.open_set_classes and noise.kind != OPEN_SET:
        raise ValueError(f"--open-set-classes is for --noise {OPEN_SET} only (got --noise {noise.kind})")
    if model.lora_rank and model.freeze_backbone:
        raise ValueError("--lora-rank trains adapters in the backbone and --freeze-backbone trains none: give one")
    if not model.lora_rank and (model.lora_alpha is not None or model.lora_targets):
        raise ValueError("--lora-alpha and --lora-targets shape LoRA adapters: give --lora-rank too")
    if model.lora_rank and settings.iterative.iterations > 1:
        raise ValueError(
            f"--lora-rank with --iterations {settings.iterative.iterations}: the next iteration's mentor is the "
            "previous best mentor merged into a plain timm model, which a LoRA student cannot average; run one "
            "iteration"
        )
    if model.pretrained and model.checkpoint:
        raise ValueError("--pretrained and --checkpoint both choose the starting weights: give one")
    if control.overwrite and control.resume is not None:
        raise ValueError("--overwrite starts afresh and --resume continues: give one")
    if settings.iterative.iterations > 1 and control.resume:
        raise ValueError("with --iterations, --resume continues --output-dir's iterations: give it no directory")
    if optim.smoothing and optim.loss not in (None, "cross_entropy"):
        raise ValueError(f"--smoothing is label smoothing of --loss cross_entropy, not of --loss {optim.loss}")
    output = settings.output
    if output.push_to_hub and output.export_dir is None:
        raise ValueError("--push-to-hub uploads the --export-dir: give --export-dir too")
    clean_before = settings.meta.clean_before
    if settings.meta.label_issues and clean_before not in (None, "off"):
        raise ValueError("--label-issues and --clean-before both clean the training split before training: give one")
    if clean_before not in (None, "off") and not model.from_weights:
        raise ValueError(
            f"--clean-before {clean_before} needs starting weights (--pretrained or --checkpoint): the features "
            "of a randomly initialised model cannot tell which labels are wrong"
        )


def _check_streaming(settings: RunSettings) -> None:
    """``--streaming`` reads the training split once per epoch, in order: refuse what needs it whole."""
    data, noise, iterative = settings.data, settings.noise, settings.iterative
    if not data.streaming:
        return
    clean_before, accumulation = settings.meta.clean_before, settings.optim.grad_accum_steps
    needs_whole = {
        f"--dataset {EMBEDDED}": data.embedded,
        f"--noise {noise.kind}": noise.kind != "none",
        f"--iterations {iterative.iterations}": iterative.iterations > 1,
        "--export-pred-probs": iterative.export_pred_probs,
        "--bad-images skip": data.bad_images == "skip",
        f"--grad-accum-steps {accumulation}": accumulation > 1,
        f"--clean-before {clean_before}": clean_before not in (None, "off"),
        "--label-issues": bool(settings.meta.label_issues),
    }
    refused = [flag for flag, given in needs_whole.items() if given]
    if refused:
        raise ValueError(
            f"--streaming cannot be combined with {', '.join(refused)}: a stream is read once per epoch, in order "
            "(labels as given, no cleaning, no scan of the training images, whole accumulation windows); load the "
            "data set whole instead, or leave those out"
        )
    if data.val_split is None:
        raise ValueError("--streaming needs --val-split: a validation split cannot be carved out of a stream")


def _check_paths(settings: RunSettings) -> None:
    dataset = settings.data.dataset
    if dataset != EMBEDDED and _looks_local(dataset):
        found = glob.glob(os.path.expanduser(dataset)) if glob.has_magic(dataset) else [dataset]
        if not found or not all(os.path.exists(os.path.expanduser(path)) for path in found):
            raise ValueError(
                f"--dataset {dataset}: no such file or directory (give '{EMBEDDED}', a save_to_disk or imagefolder "
                "directory, parquet files, or a hub id such as 'user/name')"
            )
    checkpoint, resume = settings.model.checkpoint, settings.control.resume
    if checkpoint is not None and not Path(checkpoint).expanduser().is_file():
        raise ValueError(f"--checkpoint {checkpoint}: no such file (a .safetensors or torch file)")
    issues = settings.meta.label_issues
    if issues is not None and not Path(issues).expanduser().is_file():
        raise ValueError(f"--label-issues {issues}: no such file (an earlier run's label_issues.csv)")
    if resume and not Path(resume).expanduser().is_dir():
        raise ValueError(f"--resume {resume}: no such checkpoint directory")
    export, control = settings.output.export_dir, settings.control
    if export is not None and export.expanduser().is_dir() and any(export.expanduser().iterdir()):
        if not control.overwrite and control.resume is None:
            raise ValueError(f"--export-dir {export} is not empty: choose another, or --overwrite replaces its files")


def _looks_local(dataset: str) -> bool:
    """A path, not a hub id: it exists, or is absolute / relative / home-based, or a glob or parquet file."""
    return (
        os.path.exists(dataset)
        or dataset.startswith(("/", "./", "../", "~"))
        or glob.has_magic(dataset)
        or dataset.endswith(".parquet")
        or dataset.count("/") > 1  # a hub id is "user/name"
    )


def _check_output_dir(settings: RunSettings) -> None:
    output = settings.output.output_dir.expanduser()
    blocking = next((path for path in (output, *output.parents) if path.exists() and not path.is_dir()), None)
    if blocking is not None:
        where = "is a file" if blocking == output else f"{blocking} is a file"
        raise ValueError(f"--output-dir {output}: {where}, not a directory")
    check_writable(output)
    if settings.control.resume is not None or settings.control.overwrite:
        return
    found = previous_run(output)
    if found:
        raise ValueError(
            f"--output-dir {output} already holds a run ({', '.join(found)}): pass --resume to continue it, "
            "another --output-dir for a new run, or --overwrite to replace it"
        )


def check_writable(output: Path) -> None:
    """Refuse (ValueError) an output directory the run could not write to, before training starts.

    Writes and removes a probe file in ``output``, or in its nearest existing parent when it does
    not exist yet (where the run would create it): a read-only file system, a missing
    permission or a quota fails here, in a second, not at the first checkpoint an epoch later.
    Nothing is created; the probe's name is unique to the process (every rank checks).
    """
    existing = next(path for path in (output, *output.parents) if path.exists())
    probe = existing / f".noisy-meta-write-check-{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        where = "there" if existing == output else f"in {existing}"
        raise ValueError(f"--output-dir {output}: cannot write {where} ({error.strerror or error})") from None


def previous_run(output: Path) -> list[str]:
    """What an earlier run left in ``output`` (names), empty when there is none."""
    if not output.is_dir():
        return []
    names = [name for name in RUN_ARTEFACTS if (output / name).exists()]
    return names + sorted(path.name for path in output.glob(_ITERATION_DIRS))


def flag_of(message: str, fields: list[str]) -> str:
    """A MetaNoiseConfig error message with its field names spelled as the flags that set them."""
    for name in sorted(fields, key=len, reverse=True):
        flag = "--meta-seed" if name == "seed" else "--" + name.replace("_", "-")
        message = re.sub(rf"(?<![\w-]){name}(?![\w-])", flag, message)
    return message.replace("invalid MetaNoiseConfig: ", "")
