"""Checkpoints and the metrics log of a fine-tuning run.

Layout of ``<output-dir>``::

    last/   every epoch      student.safetensors, mentor.safetensors + Accelerate's state
    best/   best epoch       the same
    metrics.jsonl            one JSON object per epoch
    pred_probs.npz           with --export-pred-probs: the best mentor's training-set
                             probabilities (labels, pred_probs, index) for cleanlab

With ``--iterations K`` each run has this layout in ``iteration_<k>/``, and from the second
on also ``cleaning.json`` (the cleaning report) and ``pred_probs.npz`` (what it judged).

``student.safetensors`` and ``mentor.safetensors`` are plain state dicts that
``timm.create_model(name, num_classes=..., checkpoint_path=...)`` loads. Beside them,
``accelerator.save_state`` keeps optimizer, scheduler, GradScaler, RNG and the wrapper's
state, so ``--resume`` continues exactly. A directory is written under a temporary name and
then renamed, so an interrupted save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

STUDENT_FILE = "student.safetensors"
MENTOR_FILE = "mentor.safetensors"
METRICS_FILE = "metrics.jsonl"
CLEANING_FILE = "cleaning.json"
PRED_PROBS_FILE = "pred_probs.npz"


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


def save_checkpoint(accelerator: Any, directory: Path, student: nn.Module, mentor: nn.Module) -> None:
    """Accelerate's full state plus plain student / mentor weights in ``directory`` (replaced whole)."""
    staging = directory.with_name(directory.name + ".tmp")
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if accelerator.is_main_process:
        save_weights(student, staging / STUDENT_FILE)
        save_weights(mentor, staging / MENTOR_FILE)
        previous = directory.with_name(directory.name + ".old")
        if directory.exists():
            if previous.exists():  # left over from an interrupted save; `directory` is newer
                shutil.rmtree(previous)
            directory.rename(previous)
        staging.rename(directory)
        if previous.exists():
            shutil.rmtree(previous)
    accelerator.wait_for_everyone()


def find_checkpoint(directory: Path) -> Path:
    """``directory``, or the copy `save_checkpoint` set aside if a save was interrupted mid-swap."""
    if directory.is_dir():
        return directory
    previous = directory.with_name(directory.name + ".old")
    if previous.is_dir():
        return previous
    raise FileNotFoundError(f"--resume: no checkpoint directory at {directory}")


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
        """Keep the records of the first ``epochs`` epochs (what a resumed run has done)."""
        records = [r for r in self.read() if r["epoch"] < epochs]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in records))


class RunState:
    """Epoch counter and best score, checkpointed with ``accelerator.register_for_checkpointing``."""

    def __init__(self) -> None:
        self.epoch = 0
        self.best_score = float("-inf")
        self.best_epoch = -1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "best_score": self.best_score, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.best_score = float(state["best_score"])
        self.best_epoch = int(state["best_epoch"])
