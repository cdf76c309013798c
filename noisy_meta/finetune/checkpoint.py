"""Checkpoints and the metrics log of a fine-tuning run.

Layout of ``<output-dir>``::

    last/   the newest state student.safetensors, mentor.safetensors, position.json
                             + Accelerate's state; written after every epoch, every
                             --checkpoint-every updates and when a signal stops the run
    best/   best epoch       the same
    checkpoints/update_<n>/  with --keep-checkpoints K > 1: the K - 1 checkpoints ``last/``
                             held before, named by their update count
    metrics.jsonl            one JSON object per epoch
    pred_probs.npz           with --export-pred-probs: the best mentor's training-set
                             probabilities (labels, pred_probs, index) for cleanlab

With ``--iterations K`` each run has this layout in ``iteration_<k>/``, and from the second
on also ``cleaning.json`` (the cleaning report) and ``pred_probs.npz`` (what it judged).

``student.safetensors`` and ``mentor.safetensors`` are plain state dicts that
``timm.create_model(name, num_classes=..., checkpoint_path=...)`` loads. Beside them,
``accelerator.save_state`` keeps optimizer, scheduler, GradScaler, RNG and the wrapper's
state, so ``--resume`` continues exactly. A directory is written under a temporary name,
fsynced, and then renamed, so an interrupted save leaves the previous checkpoint intact.
``position.json`` says where in the run a checkpoint was taken (epochs done, batches of the
next epoch done, updates, and why it was written).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .names import HISTORY_DIR, MENTOR_FILE, POSITION_FILE, STUDENT_FILE


def save_weights(module: nn.Module, path: str | os.PathLike) -> None:
    """``module``'s state dict as safetensors (contiguous copies; shared tensors de-duplicated)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, tensor in module.state_dict().items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel():  # tied weights: safetensors refuses shared storage
            tensors[name] = tensor.detach().clone().contiguous().cpu()
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    save_file(tensors, os.fspath(path), metadata={"format": "pt"})


def save_checkpoint(
    accelerator: Any,
    directory: Path,
    student: nn.Module,
    mentor: nn.Module,
    position: dict[str, Any] | None = None,
    keep: int = 1,
) -> None:
    """Accelerate's full state plus plain student / mentor weights in ``directory`` (replaced whole).

    ``position`` (epochs, batches, updates, reason) goes to ``position.json``. With ``keep`` > 1
    the checkpoint ``directory`` held before moves to ``checkpoints/update_<n>/`` beside it,
    and only the ``keep - 1`` newest of those stay. A write that fails (a full disk, a lost
    mount) raises an OSError saying so; the checkpoint ``directory`` held before is left as it
    was and the partial copy is removed.
    """
    staging = directory.with_name(directory.name + ".tmp")
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging))
        if accelerator.is_main_process:
            save_weights(student, staging / STUDENT_FILE)
            save_weights(mentor, staging / MENTOR_FILE)
            if position is not None:
                (staging / POSITION_FILE).write_text(json.dumps(position) + "\n")
            _fsync_tree(staging)  # on disk before it replaces anything
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        kept = "the previous checkpoint there is intact" if directory.exists() else "no earlier checkpoint there"
        raise OSError(error.errno, f"writing the checkpoint {directory} failed ({error}); {kept}") from error
    if accelerator.is_main_process:
        _swap_in(staging, directory, keep)
    accelerator.wait_for_everyone()


def _swap_in(staging: Path, directory: Path, keep: int = 1) -> None:
    """Replace ``directory`` by ``staging``: at every moment one complete checkpoint exists.

    ``directory`` first becomes ``<name>.old`` (which `find_checkpoint` falls back to), then
    ``staging`` takes its name, then the old copy is removed (or kept, see `_retire`).
    """
    previous = directory.with_name(directory.name + ".old")
    if directory.exists():
        if previous.exists():  # left over from an interrupted save; `directory` is newer
            shutil.rmtree(previous)
        directory.rename(previous)
    staging.rename(directory)
    _fsync_directory(directory.parent)
    if previous.exists():
        _retire(previous, keep) if keep > 1 else shutil.rmtree(previous)


def _retire(previous: Path, keep: int) -> None:
    """Move a replaced checkpoint to ``checkpoints/update_<n>/``; keep the ``keep - 1`` newest there."""
    history = previous.parent / HISTORY_DIR
    history.mkdir(exist_ok=True)
    updates = read_position(previous).get("updates")
    target = history / f"update_{updates if updates is not None else 0}"
    if target.exists():  # from a run that went further before it was resumed from an earlier checkpoint
        shutil.rmtree(target)
    previous.rename(target)
    kept = sorted(history.glob("update_*"), key=_update_count)
    for stale in kept[: max(len(kept) - (keep - 1), 0)]:
        shutil.rmtree(stale)
    _fsync_directory(history)


def _update_count(directory: Path) -> int:
    suffix = directory.name.removeprefix("update_")
    return int(suffix) if suffix.isdigit() else -1


def read_position(directory: Path) -> dict[str, Any]:
    """The ``position.json`` of a checkpoint (empty for checkpoints written before it existed)."""
    path = directory / POSITION_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def find_checkpoint(directory: Path) -> Path:
    """``directory``, or the copy `save_checkpoint` set aside if a save was interrupted mid-swap."""
    if directory.is_dir():
        return directory
    previous = directory.with_name(directory.name + ".old")
    if previous.is_dir():
        return previous
    raise FileNotFoundError(f"--resume: no checkpoint directory at {directory}")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or made for another model."""


#: Files every checkpoint directory must hold (beside Accelerate's RNG and custom states).
REQUIRED_FILES = ("model.safetensors", "optimizer.bin", STUDENT_FILE, MENTOR_FILE)


def read_weights(path: Path, model: nn.Module, role: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file made for ``model``, or a `CheckpointError` saying what is wrong.

    ``role`` names the file's use in the message (e.g. "--resume", "the previous mentor").
    Unreadable (truncated, corrupted, not safetensors), other parameter names (another
    architecture) and other shapes (e.g. another number of classes) are each reported with
    the file's path.
    """
    if not path.is_file():
        raise CheckpointError(f"{role}: {path} does not exist")
    tensors = _load_readable(path, role)
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{role}: {path} was not saved from this architecture ({type(model).__name__}): "
            f"{len(missing)} parameters missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}); check --model"
        )
    shapes = [(k, tuple(tensors[k].shape), tuple(v.shape)) for k, v in expected.items() if tensors[k].shape != v.shape]
    if shapes:
        name, found, wanted = shapes[0]
        raise CheckpointError(
            f"{role}: {path} holds other shapes than the model: {name} is {found} in the file, {wanted} "
            f"in the model ({len(shapes)} such tensors; another number of classes? check --num-classes)"
        )
    return tensors


def check_body_weights(path: str, model: nn.Module, what: str) -> None:
    """Refuse ``--checkpoint`` weights that cannot initialise ``model`` apart from its classifier.

    timm loads such files leniently (a classifier of another size is replaced, and unknown or
    missing keys are only logged), so a file from another architecture would silently leave
    the model at random initialisation: here every non-classifier tensor must be present with
    the model's shape. Accepts safetensors and torch files (a state dict, possibly under
    ``state_dict`` / ``model`` and with a ``module.`` prefix).
    """
    role = "--checkpoint"
    tensors = _load_readable(Path(path), role)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(tensors, dict) and isinstance(tensors.get(key), dict):
            tensors = tensors[key]
            break
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{role}: {path} holds a {type(tensors).__name__}, not a state dict")
    tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    prefixes = tuple(f"{name}." for name in ((classifier,) if isinstance(classifier, str) else classifier))
    body = {k: v for k, v in model.state_dict().items() if not (prefixes and k.startswith(prefixes))}
    missing = [k for k in body if k not in tensors]
    if missing:
        raise CheckpointError(
            f"{role}: {path} does not fit {what}: {len(missing)} of its {len(body)} tensors outside the "
            f"classifier are missing (e.g. {missing[:3]}); was it saved from another architecture?"
        )
    shapes = [
        (k, tuple(tensors[k].shape), tuple(v.shape))
        for k, v in body.items()
        if tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if shapes:
        name, found, wanted = shapes[0]
        raise CheckpointError(
            f"{role}: {path} does not fit {what}: {name} is {found} in the file, {wanted} in the model"
        )


def check_checkpoint(directory: Path, model: nn.Module, role: str = "--resume") -> None:
    """Refuse a checkpoint directory that lacks a file or whose weights do not fit ``model``."""
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{role}: {directory} lacks {', '.join(missing)}; it is not a complete checkpoint")
    for name in (STUDENT_FILE, MENTOR_FILE):
        read_weights(directory / name, model, role)
    _load_readable(directory / "model.safetensors", role)  # Accelerate's copy may leave out tied weights


def _load_readable(path: Path, role: str) -> Any:
    """The contents of a safetensors (or torch) file, or a `CheckpointError` if it cannot be read."""
    kind = "safetensors" if path.suffix == ".safetensors" else "torch"
    try:
        if kind == "safetensors":
            return load_file(os.fspath(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # damaged files raise many error types
        raise CheckpointError(
            f"{role}: {path} is not a readable {kind} file (truncated or corrupted?): {error}"
        ) from error
