"""What the finetune test files share: the fast flags, running the example, reading its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "finetune.py"
FAST = [
    "--model",
    "test_resnet",
    "--img-size",
    "32",
    "--no-aug",
    "--batch-size",
    "32",
    "--epochs",
    "2",
    "--first-order",
    "--num-synthetic",
    "2",
    "--num-neighbors",
    "4",
    "--val-fraction",
    "0.2",
]
TIMING_KEYS = ("seconds", "images_per_second")


def run_example(*flags: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), *flags], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def flat_tensors(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in flat_tensors(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in flat_tensors(item)]
    return []


def split_args(**overrides):
    values = dict(
        train_split="train",
        val_split=None,
        test_split="test",
        image_column="image",
        label_column="label",
        clean_label_column=None,
        num_classes=None,
        noise="symmetric",
        noise_rate=0.5,
        val_fraction=0.25,
        seed=0,
    )
    values.update(overrides)
    return values
