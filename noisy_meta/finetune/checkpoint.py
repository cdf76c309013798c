"""Checkpoints and resume of a fine-tuning run: the files, when they are written, where the run is, signals.

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
``timm.create_model(name, num_classes=..., checkpoint_path=...)`` loads (a LoRA model's adapters
merged into them; Accelerate's copy keeps the adapters apart for ``--resume``). Beside them,
``accelerator.save_state`` keeps optimizer, scheduler, GradScaler, RNG and the wrapper's
state, so ``--resume`` continues exactly. A directory is written under a temporary name,
fsynced, and then renamed, so an interrupted save leaves the previous checkpoint intact.
``position.json`` says where in the run a checkpoint was taken (epochs done, batches of the
next epoch done, updates, and why it was written).

When they are written (`RunCheckpoints`): ``last/`` after every epoch (with ``best/`` when
validation improved), every ``--checkpoint-every`` updates in mid-epoch, and when SIGTERM /
SIGINT asks the run to stop; ``--resume`` continues from it at the next batch.
``--keep-checkpoints K`` keeps the K - 1 states it replaced in ``checkpoints/update_<n>/``.

Where the run is (`RunState`, checkpointed with ``accelerator.register_for_checkpointing``) and
what it has logged (`MetricsLog`, ``metrics.jsonl``).

Stopping on a signal (`StopSignals`): the first SIGTERM / SIGINT only sets a flag; the training
loop reads it after each update (all ranks agree on it in one small all-reduce, so they stop at
the same update), writes ``last/`` and raises `RunStopped`; the command line prints how to
resume and exits with `EXIT_STOPPED`. A second signal ends the process at once. ``accelerate
launch`` (torchrun) forwards the signal to every rank and a terminal's Ctrl-C reaches launcher
and ranks alike, so a repeat within `REPEAT_WINDOW_S` counts as the same request; the launcher
kills ranks that have not exited 30 s after forwarding, so an update plus a checkpoint must fit
in that time.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from ..labels.dynamics import AreaUnderMargin
from ..runtime import is_sharded
from ..wrapper import MetaNoiseWrapper
from .settings import HISTORY_DIR, MENTOR_FILE, POSITION_FILE, STUDENT_FILE


def plain_model(module: nn.Module) -> nn.Module:
    """The timm model a PEFT (LoRA) model stands for: a merged copy, its adapters folded into the weights; any
    other module as it is. What ``student.safetensors`` / ``mentor.safetensors`` and the export hold."""
    if callable(getattr(module, "merge_and_unload", None)):
        return copy.deepcopy(module).merge_and_unload()
    return module


def save_weights(module: nn.Module, path: str | os.PathLike, state: dict[str, torch.Tensor] | None = None) -> None:
    """``module``'s state dict as safetensors (contiguous copies; shared tensors de-duplicated; a LoRA model
    merged, `plain_model`); ``state``: the whole tensors `gathered_state` collected from a sharded ``module``."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, tensor in (plain_model(module).state_dict() if state is None else state).items():
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
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Accelerate's full state plus plain student / mentor weights in ``directory`` (replaced whole).

    ``position`` (epochs, batches, updates, reason) goes to ``position.json``. With ``keep`` > 1
    the checkpoint ``directory`` held before moves to ``checkpoints/update_<n>/`` beside it,
    and only the ``keep - 1`` newest of those stay. A write that fails (a full disk, a lost
    mount) raises an OSError saying so; the checkpoint ``directory`` held before is left as it
    was and the partial copy is removed. An FSDP2 student (``--fsdp``, which Accelerate does not
    hold) and its ``optimizer`` are written whole in the files Accelerate writes for a model it
    prepared (`gathered_state`): every process must call this.
    """
    staging = directory.with_name(directory.name + ".tmp")
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    sharded = is_sharded(student)
    try:
        accelerator.save_state(str(staging))
        states = {STUDENT_FILE: gathered_state(student), MENTOR_FILE: gathered_state(mentor)} if sharded else {}
        optimizer_state = gathered_optimizer_state(student, optimizer) if sharded and optimizer is not None else None
        if accelerator.is_main_process:
            save_weights(student, staging / STUDENT_FILE, states.get(STUDENT_FILE))
            save_weights(mentor, staging / MENTOR_FILE, states.get(MENTOR_FILE))
            if optimizer_state is not None:  # as Accelerate writes a prepared model and optimizer
                save_weights(student, staging / ACCELERATE_MODEL_FILE, states[STUDENT_FILE])
                torch.save(optimizer_state, staging / ACCELERATE_OPTIMIZER_FILE)
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


def gathered_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """An FSDP2 module's state dict as whole tensors on the main process, in CPU memory (the other processes get an
    empty dict): each process sends its shards, so every process must call this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state of an FSDP2 ``model``, whole, on the main process, in the layout of
    ``optimizer.state_dict()`` (parameters numbered in the optimizer's order), which Accelerate writes for a
    prepared optimizer; the other processes get an empty dict. Every process must call this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:
        return {}
    number = {name: i for i, name in enumerate(name for group in state["param_groups"] for name in group["params"])}
    return {
        "state": {number[name]: value for name, value in state["state"].items()},
        "param_groups": [{**group, "params": [number[n] for n in group["params"]]} for group in state["param_groups"]],
    }


def load_sharded_training(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore an FSDP2 ``model`` and its ``optimizer`` from the whole tensors of a checkpoint ``directory``
    (`save_checkpoint`): every process reads the files and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, load_file(os.fspath(directory / ACCELERATE_MODEL_FILE)), options=whole)
    saved = torch.load(directory / ACCELERATE_OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    named = {
        "state": {order[number]: value for number, value in saved["state"].items()},
        "param_groups": [{**group, "params": [order[n] for n in group["params"]]} for group in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, named, options=whole)


class WholeMentorState:
    """What an FSDP2 run registers for checkpointing in its wrapper's place: the wrapper's state with the sharded
    mentor's weights whole (gathered onto the main process, which writes them, as a DDP run's wrapper state holds
    them); loaded back, each process keeps its shards (`noisy_meta.mentor.Mentor.load_state_dict`)."""

    def __init__(self, wrapper: MetaNoiseWrapper) -> None:
        self.wrapper = wrapper

    def state_dict(self) -> dict[str, Any]:
        return {**self.wrapper.state_dict(), "mentor": gathered_state(self.wrapper.mentor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wrapper.load_state_dict(state)


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


#: The files Accelerate writes for the model and the optimizer it prepared (an FSDP2 run writes them itself).
ACCELERATE_MODEL_FILE, ACCELERATE_OPTIMIZER_FILE = "model.safetensors", "optimizer.bin"
#: Files every checkpoint directory must hold (beside Accelerate's RNG and custom states).
REQUIRED_FILES = (ACCELERATE_MODEL_FILE, ACCELERATE_OPTIMIZER_FILE, STUDENT_FILE, MENTOR_FILE)


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
    plain = plain_model(model)
    for name in (STUDENT_FILE, MENTOR_FILE):
        read_weights(directory / name, plain, role)
    _load_readable(directory / ACCELERATE_MODEL_FILE, role)  # Accelerate's copy may leave out tied weights


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


class MetricsLog:
    """``metrics.jsonl``: one JSON object per epoch, appended as epochs finish."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, epochs: int) -> None:
        """Keep the records of the first ``epochs`` epochs (what a resumed run has done; epochs count from 1)."""
        records = [r for r in self.read() if r["epoch"] <= epochs]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in records))


def validation_score(record: dict[str, Any]) -> float:
    """An epoch's validation score, which ``best/`` keeps the maximum of: the better of student and mentor."""
    return max(record["val_student"], record["val_mentor"])


@dataclass
class SkipCounter:
    """Consecutive updates skipped for a non-finite loss or gradient; ``limit`` 0 never stops."""

    limit: int
    consecutive: int = 0


class RunState:
    """Where the run is, checkpointed with ``accelerator.register_for_checkpointing``.

    ``epoch`` counts the epochs done, ``batch`` the batches of the next epoch done (0 at an
    epoch's end), ``totals`` that epoch's running sums of the training statistics so far and
    ``skips`` the non-finite updates in a row: with them a checkpoint taken mid-epoch resumes
    at the next batch with the epoch's figures as if never interrupted.
    """

    def __init__(self, max_consecutive_skips: int = 0, aum: AreaUnderMargin | None = None) -> None:
        #: Each training sample's margin on its given label so far (`noisy_meta.AreaUnderMargin`; None for a stream).
        self.aum = aum
        self.epoch = 0
        self.batch = 0
        self.totals: dict[str, float] = {}
        self.skips = SkipCounter(max_consecutive_skips)
        self.best_score = float("-inf")
        self.best_epoch = -1

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "totals": dict(self.totals),
            "consecutive_skips": self.skips.consecutive,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            **({"aum": self.aum.state_dict()} if self.aum is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batch = int(state.get("batch", 0))  # checkpoints of earlier versions: epoch ends only
        self.totals = {key: float(value) for key, value in state.get("totals", {}).items()}
        self.skips.consecutive = int(state.get("consecutive_skips", 0))
        self.best_score = float(state["best_score"])
        self.best_epoch = int(state["best_epoch"])
        if self.aum is not None and "aum" in state:  # checkpoints of earlier versions: the scores start afresh
            self.aum.load_state_dict(state["aum"])


#: The exit status of a run stopped by a signal after writing its checkpoint: sysexits'
#: EX_TEMPFAIL ("try again later"), distinct from success (0), errors (1, 2) and a kill (>128).
EXIT_STOPPED = 75

#: A second signal this soon after the first is the same request delivered twice (launcher and
#: terminal or scheduler), not a person asking to stop at once.
REPEAT_WINDOW_S = 2.0

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(Exception):
    """The run stopped on a signal after writing ``checkpoint``; ``--resume`` continues it."""

    def __init__(self, signal_name: str, checkpoint: Path, updates: int) -> None:
        super().__init__(
            f"stopped by {signal_name} after update {updates}; the checkpoint is {checkpoint}/, "
            "run the same command with --resume to continue from it"
        )
        self.signal_name, self.checkpoint, self.updates = signal_name, checkpoint, updates


class StopSignals:
    """A context that turns SIGTERM / SIGINT into a request the training loop honours between updates.

    Outside the main thread (where Python cannot install handlers) it does nothing and signals
    keep their usual effect.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received, self._received_at = number, time.monotonic()
            return
        if time.monotonic() - self._received_at < REPEAT_WINDOW_S:
            return
        signal.signal(number, signal.SIG_DFL)  # a second request: stop now, as with no handler
        os.kill(os.getpid(), number)

    def agreed(self, accelerator: Any) -> str | None:
        """The name of the signal any rank received (the same answer on every rank), or None."""
        received = self.received or 0
        if accelerator.num_processes > 1:
            flag = torch.tensor([received], dtype=torch.int64, device=accelerator.device)
            received = int(accelerator.reduce(flag, reduction="max").item())
        return signal.Signals(received).name if received else None


class RunCheckpoints:
    """The checkpoints of one run into ``output_dir``.

    Args:
        accelerator: the run's accelerator (its state, RNGs and registered objects are saved).
        wrapper: the MLNT wrapper (student, mentor, counters).
        state: the run's position and best score, registered for checkpointing.
        output_dir: where ``last/``, ``best/`` and ``checkpoints/`` go.
        every: write ``last/`` every this many updates as well; 0: at epoch ends only.
        keep: how many of the newest ``last/`` states to keep (``last/`` itself included).
        signals: the stop requests the run honours after each update and each epoch.
        flags: the run's flags as ``args.yaml`` records them (`noisy_meta.finetune.flags.recorded_flags`), kept in
            each checkpoint's ``position.json`` so that ``--resume`` can say what changed.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        wrapper: MetaNoiseWrapper,
        state: RunState,
        output_dir: Path,
        every: int = 0,
        keep: int = 1,
        signals: StopSignals | None = None,
        flags: dict[str, Any] | None = None,
    ) -> None:
        self.accelerator, self.wrapper, self.state = accelerator, wrapper, state
        self.output_dir, self.every, self.keep = output_dir, every, keep
        self.signals = signals if signals is not None else StopSignals()
        self.flags = flags
        self._saved_at = wrapper.num_updates  # a resumed run does not rewrite the state it started from

    def after_update(self, last_batch: bool) -> None:
        """Called on every rank after each optimizer update (``state`` already at this batch).

        Writes ``last/`` when ``--checkpoint-every`` is due and stops the run when a signal
        asked for it; on the epoch's last batch both are left to `after_epoch` (it validates,
        then writes ``last/``).
        """
        updates = self.wrapper.num_updates
        stop = self.signals.agreed(self.accelerator)
        if last_batch:  # a stop waits for the epoch's end, a moment away
            return
        if stop is not None:
            raise RunStopped(stop, self._save_last(f"stopped by {stop}"), updates)
        if self.every > 0 and updates % self.every == 0 and updates != self._saved_at:
            self._save_last(f"every {self.every} updates")

    def after_epoch(self, record: dict[str, Any], final: bool = False) -> None:
        """``last/`` after every epoch, ``best/`` when the validation score (student or mentor) improved.

        A stop requested during the epoch ends the run here, unless it was the ``final`` one.
        """
        epoch = record["epoch"]  # 1-based: the number of epochs done
        score = validation_score(record)
        state = self.state
        state.epoch, state.batch, state.totals = epoch, 0, {}
        if score > state.best_score:
            state.best_score, state.best_epoch = score, epoch
            self._save("best", "best epoch")
        self._save_last("epoch end")
        stop = self.signals.agreed(self.accelerator)
        if stop is not None and not final:
            raise RunStopped(stop, self.output_dir / "last", self.wrapper.num_updates)

    def _save_last(self, reason: str) -> Path:
        self._saved_at = self.wrapper.num_updates
        return self._save("last", reason, self.keep)

    def _save(self, name: str, reason: str, keep: int = 1) -> Path:
        if self.state.aum is not None:  # every rank's margins in the state every rank saves
            self.state.aum.all_reduce()
        directory = self.output_dir / name
        position = {
            "epoch": self.state.epoch,
            "batch": self.state.batch,
            "updates": self.wrapper.num_updates,
            "reason": reason,
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if self.flags is not None:
            position["flags"] = self.flags
        wrapper = self.wrapper
        save_checkpoint(self.accelerator, directory, wrapper.module, wrapper.mentor, position, keep, wrapper.optimizer)
        return directory
