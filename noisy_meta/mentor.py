"""The mentor: the teacher whose predictions the fast-weight students must keep agreeing with.

MLNT's mentor is an exponential moving average of the student. `Mentor` owns that average
(timm's ``ModelEmaV3``), its decay schedule (`MetaNoiseConfig.mentor_decay_at`: a faster
average while the meta weight ramps up, a slower one after) and the forwards it serves: its
logits and its pooled features for the neighbour search, both in eval mode without autograd.

Trade-off worth knowing: the reference code averages parameters only, which leaves the
mentor's BatchNorm statistics at their initial values and its eval-mode predictions near
chance. Here parameters *and* buffers are averaged (``ModelEmaV3``'s default).

The decay warms up (``mentor_warmup``, as ``ModelEmaV3(use_warmup=True)``) for a mentor copied
from the initial student, never for one passed in (the best mentor of a previous run).

``mentor_update="frozen"`` keeps a mentor you pass in as it is (iterative training: the best
mentor of the previous run).

A student with frozen parameters (a linear probe, a LoRA model) lends them to a mentor copied
from it: the mentor holds the frozen trunk once, not twice, and averages what trains and the
buffers (the EMA of a constant is that constant, so this is ModelEmaV3's average, exactly).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn

from .compat import unwrap_model
from .config import MetaNoiseConfig
from .features import eval_mode, logits_and_features
from .runtime import is_dtensor


class Mentor:
    """An EMA (or frozen) copy of the student.

    Args:
        student: the unwrapped student module.
        config: the `MetaNoiseConfig` (``mentor_update`` and the decay schedule).
        initial: a starting mentor with the student's architecture; by default a copy of the
            student. The module passed is copied, never changed.
        sharded: the student is sharded with FSDP2's ``fully_shard``, which cannot be deep-copied:
            ``initial`` must then be the student's copy, sharded the same way, and is the mentor itself.
    """

    def __init__(
        self, student: nn.Module, config: MetaNoiseConfig, initial: nn.Module | None = None, sharded: bool = False
    ) -> None:
        self.config = config
        self.sharded = sharded
        #: The decay warms up only from a copy of the initial student (under FSDP2 the one passed is that copy).
        self.warmup = config.mentor_warmup and (initial is None or sharded)
        source = student if initial is None else unwrap_model(initial)
        if initial is not None and config.mentor_update == "ema":
            _check_same_state_layout(student, source)
        device = next(student.parameters()).device
        #: The student's frozen parameters, which a mentor copied from it shares (held once).
        self.shared = [p for p in student.parameters() if not p.requires_grad] if initial is None else []
        self.ema: ModelEmaV3 | None = None
        if sharded:
            self.module = _sharded_copy_of(student, source)
        elif config.mentor_update == "ema" and not self.shared:
            self.ema = ModelEmaV3(source, decay=config.mentor_decay_ramp)
            self.module = self.ema.module.to(device).requires_grad_(False)
        else:
            memo = {id(p): p for p in self.shared}
            self.module = copy.deepcopy(source, memo).eval().to(device).requires_grad_(False)
        shared_ids = {id(p) for p in self.shared}
        averaged = [(name, t) for name, t in student.state_dict(keep_vars=True).items() if id(t) not in shared_ids]
        #: What the average runs over, every state-dict entry but the shared frozen parameters: the floating-point
        #: ones are interpolated, the others (``num_batches_tracked``) copied.
        self.interpolated = [name for name, t in averaged if t.is_floating_point()]
        self.copied = [name for name, t in averaged if not t.is_floating_point()]

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        """Average ``student`` in with the decay of update ``step`` (nothing when frozen)."""
        if self.config.mentor_update != "ema":
            return
        if self.ema is not None:
            self.ema.apply_update_(student, self.decay_at(step))
            return
        if any(p.requires_grad for p in self.shared):
            raise RuntimeError(
                "a parameter that was frozen when the wrapper was built now trains; the mentor shares the "
                "frozen ones with the student, so build a new wrapper after unfreezing (e.g. between the "
                "linear probe and the fine-tuning of LP-FT)"
            )
        ours, theirs = self.module.state_dict(), student.state_dict()
        weight = 1.0 - self.decay_at(step)
        interpolated = [_local(ours[n]) for n in self.interpolated]  # FSDP2: each process its shard
        torch._foreach_lerp_(interpolated, [_local(theirs[n]) for n in self.interpolated], weight)
        for name in self.copied:
            ours[name].copy_(theirs[name])

    def decay_at(self, step: int) -> float:
        """The EMA decay of update ``step`` (`MetaNoiseConfig.mentor_decay_at`, warmed up or not)."""
        return self.config.mentor_decay_at(step, warmup=self.warmup)

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        with eval_mode(self.module):
            return self.module(inputs)

    def logits_and_features(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and pooled pre-logits features from one pass through the body."""
        return logits_and_features(self.module, inputs)

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the mentor's weights; a sharded mentor takes its own shards or whole tensors (each process holding
        all of them, as a whole-tensor checkpoint gives: each keeps its shard)."""
        if self.sharded and not any(is_dtensor(value) for value in state.values()):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True))
            return
        self.module.load_state_dict(state)


def _sharded_copy_of(student: nn.Module, mentor: nn.Module) -> nn.Module:
    """The FSDP2-sharded mentor passed for a sharded student, checked to hold the student's weights, in eval mode
    without gradients, its timm feature methods gathering their shards as its forward does."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    ours, theirs = mentor.state_dict(), student.state_dict()
    local = [_local(ours[name]).equal(_local(value)) for name, value in theirs.items()]
    if not isinstance(mentor, FSDPModule) or not all(local):
        raise ValueError(
            "under FSDP2 mentor= must be the student's copy: a second model holding the student's weights, "
            "fully_shard-ed the same way (the same mesh and ignored parameters)"
        )
    for method in ("forward_features", "forward_head"):
        if callable(getattr(mentor, method, None)):
            register_fsdp_forward_method(mentor, method)
    return mentor.eval().requires_grad_(False)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a plain tensor as it is)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _check_same_state_layout(student: nn.Module, mentor: nn.Module) -> None:
    """An EMA mentor must have the student's state-dict names and shapes."""
    layout = {name: tuple(t.shape) for name, t in student.state_dict().items()}
    other = {name: tuple(t.shape) for name, t in mentor.state_dict().items()}
    if layout != other:
        differing = sorted(set(layout.items()) ^ set(other.items()))[:5]
        raise ValueError(
            "an EMA mentor must have the student's architecture (same state-dict names and shapes); "
            f"first differences: {differing}. Use mentor_update='frozen' for a different architecture"
        )
