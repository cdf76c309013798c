"""Checks of the command line's flags that run before any data or model is loaded.

Value types (`positive_int`, `probability`, ...) make argparse refuse a bad value with the flag
named; `check_flags` refuses combinations, paths that do not exist and an output directory
that already holds a run. Each raises ``ValueError`` (``argparse.ArgumentTypeError`` for the
types) with one line naming the flag, the value and what is allowed. No heavy imports.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
from pathlib import Path

from ..labels.noise import OPEN_SET
from .names import BAD_IMAGES_FILE, EMBEDDED, HISTORY_DIR, METRICS_FILE, PRED_PROBS_FILE

#: What a finished or partial run leaves in its output directory (``--overwrite`` removes these).
RUN_ARTEFACTS = ("last", "best", "stopped", HISTORY_DIR, METRICS_FILE, PRED_PROBS_FILE, BAD_IMAGES_FILE)
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


def check_flags(args: argparse.Namespace) -> None:
    """Refuse conflicting flags, missing paths and an output directory holding a run (ValueError)."""
    _check_combinations(args)
    _check_streaming(args)
    _check_paths(args)
    _check_output_dir(args)


def _check_combinations(args: argparse.Namespace) -> None:
    low, high = args.scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"--scale {low} {high}: needs 0 < low <= high <= 1")
    if args.noise == OPEN_SET and not args.open_set_classes:
        raise ValueError(f"--noise {OPEN_SET} needs --open-set-classes (the classes whose images are the outside pool)")
    if args.noise == OPEN_SET and args.noise_rate >= 1.0:
        raise ValueError(f"--noise {OPEN_SET} needs --noise-rate below 1 (some images must stay in the label space)")
    if args.open_set_classes and args.noise != OPEN_SET:
        raise ValueError(f"--open-set-classes is for --noise {OPEN_SET} only (got --noise {args.noise})")
    if args.pretrained and args.checkpoint:
        raise ValueError("--pretrained and --checkpoint both choose the starting weights: give one")
    if args.overwrite and args.resume is not None:
        raise ValueError("--overwrite starts afresh and --resume continues: give one")
    if args.iterations > 1 and args.resume:
        raise ValueError("with --iterations, --resume continues --output-dir's iterations: give it no directory")
    if args.smoothing and args.loss not in (None, "cross_entropy"):
        raise ValueError(f"--smoothing is label smoothing of --loss cross_entropy, not of --loss {args.loss}")
    if args.clean_before not in (None, "off") and not (args.pretrained or args.checkpoint):
        raise ValueError(
            f"--clean-before {args.clean_before} needs starting weights (--pretrained or --checkpoint): the features "
            "of a randomly initialised model cannot tell which labels are wrong"
        )


def _check_streaming(args: argparse.Namespace) -> None:
    """``--streaming`` reads the training split once per epoch, in order: refuse what needs it whole."""
    if not args.streaming:
        return
    needs_whole = {
        f"--dataset {EMBEDDED}": args.dataset == EMBEDDED,
        f"--noise {args.noise}": args.noise != "none",
        f"--iterations {args.iterations}": args.iterations > 1,
        "--export-pred-probs": args.export_pred_probs,
        "--bad-images skip": args.bad_images == "skip",
        f"--grad-accum-steps {args.grad_accum_steps}": args.grad_accum_steps > 1,
        f"--workers {args.workers}": args.workers > 0,
        f"--clean-before {args.clean_before}": args.clean_before not in (None, "off"),
    }
    refused = [flag for flag, given in needs_whole.items() if given]
    if refused:
        raise ValueError(
            f"--streaming cannot be combined with {', '.join(refused)}: a stream is read once per epoch, in order, in "
            "the main process (labels as given, no cleaning, no scan of the training images, whole accumulation "
            "windows); load the data set whole instead, or leave those out"
        )
    if args.val_split is None:
        raise ValueError("--streaming needs --val-split: a validation split cannot be carved out of a stream")


def _check_paths(args: argparse.Namespace) -> None:
    dataset = args.dataset
    if dataset != EMBEDDED and _looks_local(dataset):
        found = glob.glob(os.path.expanduser(dataset)) if glob.has_magic(dataset) else [dataset]
        if not found or not all(os.path.exists(os.path.expanduser(path)) for path in found):
            raise ValueError(
                f"--dataset {dataset}: no such file or directory (give '{EMBEDDED}', a save_to_disk or imagefolder "
                "directory, parquet files, or a hub id such as 'user/name')"
            )
    if args.checkpoint is not None and not Path(args.checkpoint).expanduser().is_file():
        raise ValueError(f"--checkpoint {args.checkpoint}: no such file (a .safetensors or torch file)")
    if args.resume and not Path(args.resume).expanduser().is_dir():
        raise ValueError(f"--resume {args.resume}: no such checkpoint directory")


def _looks_local(dataset: str) -> bool:
    """A path, not a hub id: it exists, or is absolute / relative / home-based, or a glob or parquet file."""
    return (
        os.path.exists(dataset)
        or dataset.startswith(("/", "./", "../", "~"))
        or glob.has_magic(dataset)
        or dataset.endswith(".parquet")
        or dataset.count("/") > 1  # a hub id is "user/name"
    )


def _check_output_dir(args: argparse.Namespace) -> None:
    output = Path(args.output_dir).expanduser()
    blocking = next((path for path in (output, *output.parents) if path.exists() and not path.is_dir()), None)
    if blocking is not None:
        where = "is a file" if blocking == output else f"{blocking} is a file"
        raise ValueError(f"--output-dir {output}: {where}, not a directory")
    check_writable(output)
    if args.resume is not None or args.overwrite:
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
