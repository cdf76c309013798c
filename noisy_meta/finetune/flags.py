"""The command line's flags: their checks before anything is loaded, and ``args.yaml`` / ``--config``.

Value types (`positive_int`, `probability`, ...) make argparse refuse a bad value with the flag
named; `check_settings` refuses combinations, paths that do not exist and an output directory
that already holds a run. Each raises ``ValueError`` (``argparse.ArgumentTypeError`` for the
types) with one line naming the flag, the value and what is allowed.

``<output-dir>/args.yaml`` is what a run was started with. As timm's ``train.py`` does, a run
writes its flags to ``args.yaml`` (every resolved flag, the data set's defaults filled in, by
the names ``--help`` shows with ``-`` as ``_``); beside them
the `MetaNoiseConfig` it trained with and the versions of the packages that ran it.
``--config FILE.yaml`` reads such a file (or any mapping of flag names to values) as the
defaults of the command line, so flags given on the command line win.

Every checkpoint's ``position.json`` records the same flags, so ``--resume`` can say which
settings differ from the run that wrote it (`resume_differences`) and refuse the ones that
would make the restored state wrong for the new run (`RESUME_BREAKING`). No heavy imports:
the command line reads a config file before torch is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import platform
import re
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from ..config import SHARDABLE_FAST_PARAMS
from ..labels.noise import OPEN_SET
from .settings import (
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
    RunSettings,
)

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
    if optim.fsdp:
        _check_fsdp(settings)
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


def _check_fsdp(settings: RunSettings) -> None:
    """What ``--fsdp`` cannot run with, refused in one line each before anything loads."""
    optim, iterations = settings.optim, settings.iterative.iterations
    refusals = (
        (
            optim.mixed_precision == "fp16",
            "--mixed-precision fp16",
            "use --mixed-precision bf16 (fp16's GradScaler is not run over sharded gradients)",
        ),
        (
            optim.grad_accum_steps > 1,
            f"--grad-accum-steps {optim.grad_accum_steps}",
            "FSDP2 reduces every micro-batch's gradient in the meta step's last backward; raise --batch-size or "
            "the number of processes",
        ),
        (
            iterations > 1,
            f"--iterations {iterations}",
            "the next iteration's mentor is a whole timm model, not a sharded copy of the student",
        ),
        (
            settings.model.lora_rank > 0,
            "--lora-rank",
            "the checkpoints merge the adapters, which needs a whole copy of the model; shard a LoRA model with "
            "noisy_meta.fully_shard_trunk in your own loop",
        ),
    )
    for refused, flag, why in refusals:
        if refused:
            raise ValueError(f"--fsdp with {flag}: {why}")
    fast_params = settings.meta.fields.get("fast_params")
    given = fast_params is not None and "fast_params" not in settings.meta.defaulted
    if given and fast_params not in SHARDABLE_FAST_PARAMS:
        raise ValueError(
            f"--fsdp with --fast-params {fast_params}: second order cannot reach the sharded trunk, so the fast "
            f"weights must be a suffix left whole: {' or '.join(SHARDABLE_FAST_PARAMS)}"
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


#: Flags that say how this invocation runs, not what the run is: not recorded, not compared.
INVOCATION_FLAGS = ("config", "resume", "overwrite", "debug")
#: Flags a resumed run must share with the checkpoint's: they decide the model's shape, which
#: images are trained on with which labels, in which order, and what the optimizer and the
#: schedule hold; a change would continue the run on state that belongs to another one.
RESUME_BREAKING = (
    "model",
    "num_classes",
    "img_size",
    "freeze_backbone",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "dataset",
    "train_split",
    "val_split",
    "val_fraction",
    "image_column",
    "label_column",
    "clean_label_column",
    "bad_images",
    "noise",
    "noise_rate",
    "open_set_classes",
    "seed",
    "batch_size",
    "grad_accum_steps",
    "opt",
    "sched",
    "streaming",
    "iterations",
    "clean_before",
    "clean_before_k",
    "clean_before_threshold",
    "label_issues",
    "label_issues_action",
)
#: Packages whose versions ``args.yaml`` records.
_PACKAGES = ("noisy-meta", "torch", "timm", "accelerate", "datasets", "safetensors")


def recorded_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """``flags`` (a run's resolved flags) as ``args.yaml`` and ``position.json`` record them: plain YAML / JSON
    values, the invocation's own flags left out."""
    return {name: _plain(value) for name, value in flags.items() if name not in INVOCATION_FLAGS}


def write_args_file(path: Path, flags: Mapping[str, Any], meta_config: Any | None = None) -> None:
    """Write ``args.yaml``: ``flags`` (a run's resolved flags), the run's `MetaNoiseConfig` and package versions.

    The file is what ``--config`` reads back: its ``flags`` section starts the same run.
    """
    record: dict[str, Any] = {"flags": recorded_flags(flags)}
    if meta_config is not None:
        record["meta_config"] = {f.name: _plain(getattr(meta_config, f.name)) for f in dataclasses.fields(meta_config)}
    record["versions"] = {"python": platform.python_version(), **{name: _version(name) for name in _PACKAGES}}
    header = "# written by noisy-meta: `--config` this file to start the same run (flags on the command line win)\n"
    path.write_text(header + yaml.safe_dump(record, sort_keys=False))


def read_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The flag values of a ``--config`` file, checked against ``parser``: ``{dest: value}``.

    The file is YAML: a mapping of flag names (``lr``, ``batch_size``, ``num_synthetic``; ``-``
    may stand for ``_``; the names ``args.yaml`` records, such as ``meta_num_synthetic``, work
    too) to values, or an ``args.yaml`` a run wrote (its ``flags`` section; ``meta_config`` and
    ``versions`` are what the run resolved and ran with, not read). Raises ValueError naming
    the file and the key for a name that is no flag, the ``no_`` form of a switch (write the
    switch's name and ``false``), a value not among a flag's choices or one its type refuses.
    """
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ValueError(f"--config {path}: not valid YAML{where} ({problem})") from None
    if loaded is None:
        return {}
    if isinstance(loaded, dict) and isinstance(loaded.get("flags"), dict):
        loaded = loaded["flags"]
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got {type(loaded).__name__}")
    actions = [action for action in parser._actions if action.dest not in ("help", "config")]
    # what args.yaml records; of two flags sharing a destination (--no-X, then --X VALUE) the last
    by_dest = {action.dest: action for action in actions}
    by_flag = {flag: action for action in actions for flag in action.option_strings}  # what --help shows
    values: dict[str, Any] = {}
    for key, value in loaded.items():
        name = str(key).lstrip("-")
        flag = "--" + name.replace("_", "-")
        flagged = by_flag.get(flag)
        action = by_dest.get(name.replace("-", "_"), flagged)
        if action is None:
            raise ValueError(f"--config {path}: {key!r} is not a flag (see --help)")
        if action is flagged and flag.startswith("--no-") and _negates(action):
            raise ValueError(f"--config {path}: {key!r}: write '{flag[len('--no-') :].replace('-', '_')}: false'")
        values[action.dest] = _checked(path, key, value, action)
    return values


def _negates(action: argparse.Action) -> bool:
    """Whether the ``--no-`` flag of ``action`` turns a switch off (its value in a file would read backwards)."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return True
    return isinstance(action, argparse._StoreConstAction) and action.const is False


def _checked(path: str, key: Any, value: Any, action: argparse.Action) -> Any:
    """``value`` as the flag's own parsing would give it (its type applied to strings, choices checked)."""
    if value is None:
        return None
    if action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 0):
        items = value if isinstance(value, list) else [value]
        return [_one(path, key, item, action) for item in items]
    return _one(path, key, value, action)


def _one(path: str, key: Any, value: Any, action: argparse.Action) -> Any:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ValueError(f"--config {path}: {key!r} takes true or false, got {value!r}")
        return value
    if isinstance(value, (str, int, float)):
        kind = action.type or str  # a flag without a type takes strings: `model: 18` is "18"
        try:
            value = kind(value if isinstance(value, str) else str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            raise ValueError(f"--config {path}: {key!r}: {error}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ValueError(f"--config {path}: {key!r} is {value!r}, not one of {choices}")
    return value


def resume_differences(recorded: Mapping[str, Any], flags: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The settings a resumed run changes from the checkpoint's: ``(breaking, others)``, each as
    ``"name: old -> new"``. ``recorded``: the checkpoint's flags (`recorded_flags`); ``flags``: this run's."""
    current = recorded_flags(flags)
    breaking, others = [], []
    for name in sorted(set(recorded) | set(current)):
        if name in INVOCATION_FLAGS or recorded.get(name) == current.get(name):
            continue
        change = f"{name}: {recorded.get(name)!r} -> {current.get(name)!r}"
        (breaking if name in RESUME_BREAKING else others).append(change)
    return breaking, others


def _plain(value: Any) -> Any:
    """``value`` as plain YAML / JSON: paths as strings, tuples as lists, any other object by its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    return repr(value)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
