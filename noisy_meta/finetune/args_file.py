"""``<output-dir>/args.yaml``: what a run was started with, and ``--config FILE.yaml`` to start one from it.

As timm's ``train.py`` does, a run writes its flags to ``args.yaml`` (every resolved flag, the
data set's defaults filled in, by the names ``--help`` shows with ``-`` as ``_``); beside them
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
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from .names import ARGS_FILE

__all__ = [
    "ARGS_FILE",
    "INVOCATION_FLAGS",
    "RESUME_BREAKING",
    "read_config_file",
    "recorded_flags",
    "resume_differences",
    "write_args_file",
]

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
