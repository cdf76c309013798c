"""`MetaNoiseWrapper.state_dict` as files beside another library's checkpoint.

The Hugging Face ``Trainer`` and Lightning write their own checkpoints; the adapters
(`noisy_meta.hf`, `noisy_meta.lightning`) keep MLNT's state beside them: the mentor's
weights and the synthetic labels' generators in one safetensors file, the counters, the seed
and the fast step's scale (`noisy_meta.fast_weights.FastStepSize`) in its metadata. No pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

#: The file the adapters write into a checkpoint directory.
STATE_FILE = "noisy_meta_state.safetensors"


def save_loop_state(state: dict[str, Any], path: str | Path) -> None:
    """Write a `MetaNoiseWrapper.state_dict` to ``path`` (safetensors)."""
    tensors = {f"mentor.{name}": value.detach().cpu().contiguous() for name, value in state["mentor"].items()}
    tensors.update({f"generator.{device}": value for device, value in state["generators"].items()})
    counters = {key: state[key] for key in ("num_updates", "num_skipped", "seed", "fast_step_size") if key in state}
    save_file(tensors, str(path), metadata={"noisy_meta": json.dumps(counters)})


def load_loop_state(path: str | Path) -> dict[str, Any]:
    """Read what `save_loop_state` wrote, as `MetaNoiseWrapper.load_state_dict` takes it."""
    with safe_open(str(path), framework="pt") as f:
        counters = json.loads(f.metadata()["noisy_meta"])
    tensors = load_file(str(path))
    mentor = {name[len("mentor.") :]: value for name, value in tensors.items() if name.startswith("mentor.")}
    generators = {
        name[len("generator.") :]: value.to(torch.uint8)
        for name, value in tensors.items()
        if name.startswith("generator.")
    }
    return {**counters, "generators": generators, "mentor": mentor}
