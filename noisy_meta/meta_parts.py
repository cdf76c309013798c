"""What every way of running MLNT builds around a student: the config, the mentor, the meta objective.

`MetaNoiseWrapper` (which also owns the optimizer step) and `noisy_meta.timm.MetaNoiseTask`
(which leaves the backward and the step to timm's ``train.py``) build the same pieces in the
same order with `MetaParts.build`, and resolve their configuration with `resolve_config`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .compat import make_twice_differentiable, unwrap_model
from .config import RUN_LENGTH_FIELDS, MetaNoiseConfig, run_length_schedule
from .fast_scope import WholeModel, make_scope
from .fast_weights import select_fast_params
from .losses import Criterion, resolve_criterion
from .mentor import Mentor
from .meta_objective import MetaObjective
from .update_state import UpdateState


def resolve_config(
    config: MetaNoiseConfig | None, total_updates: int | None, overrides: dict[str, Any]
) -> MetaNoiseConfig:
    """``config`` (default: the library's) with the run-length schedule for ``total_updates`` on the
    schedule fields it leaves at the library defaults, then ``overrides``."""
    config = MetaNoiseConfig() if config is None else config
    if not isinstance(config, MetaNoiseConfig):
        raise TypeError(f"config must be a MetaNoiseConfig, got {type(config).__name__}")
    if total_updates is not None:
        schedule = run_length_schedule(total_updates)
        overrides = {**{k: v for k, v in schedule.items() if at_library_default(config, k)}, **overrides}
    return config.with_overrides(**overrides) if overrides else config


def has_library_schedule(config: MetaNoiseConfig) -> bool:
    """Whether the meta step is on and every schedule field is the library's long-run default."""
    return config.meta_weight > 0 and all(at_library_default(config, name) for name in RUN_LENGTH_FIELDS)


def at_library_default(config: MetaNoiseConfig, name: str) -> bool:
    return getattr(config, name) == MetaNoiseConfig.__dataclass_fields__[name].default


@dataclass
class MetaParts:
    """The student (unwrapped), its mentor, the meta objective, the fast-weight scope, the loss on the labels."""

    module: nn.Module
    params: list[nn.Parameter]
    mentor: Mentor
    objective: MetaObjective
    scope: WholeModel
    compat_changes: list[str]
    num_classes: int | None
    criterion: Criterion

    @classmethod
    def build(
        cls,
        model: nn.Module,
        config: MetaNoiseConfig,
        shared_seed: Callable[[int | None, torch.device], int],
        mentor: nn.Module | None = None,
    ) -> MetaParts:
        """Build the pieces for ``model`` (possibly DDP-wrapped or compiled).

        ``shared_seed(seed, device)`` gives the synthetic labels' seed, the same on every rank.
        The fast parameters are chosen before anything changes the model; the mentor is copied
        before the student is made twice differentiable, so it keeps the faster fused ops.
        """
        module = unwrap_model(model)
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        fast_names = select_fast_params(module, config.fast_params)
        teacher = Mentor(module, config, mentor)
        changes = [] if config.first_order else make_twice_differentiable(module)
        objective = MetaObjective(config, module, teacher, shared_seed(config.seed, params[0].device))
        scope = make_scope(module, config, fast_names)
        num_classes = getattr(module, "num_classes", None)
        return cls(module, params, teacher, objective, scope, changes, num_classes, resolve_criterion(config.criterion))

    def use_config(self, config: MetaNoiseConfig) -> None:
        """A config whose schedules were refitted (`resolve_config` with the run's length): the mentor's decay and
        the objective read it from now on."""
        self.mentor.config = self.objective.config = config

    def advance_mentor(self, runtime: Any, updates: UpdateState, config: MetaNoiseConfig, fix: str | None) -> None:
        """After an optimizer update: BatchNorm statistics equal on all ranks (``dist_bn``), the mentor's EMA, the
        counter; once, at `SHORT_RUN_WARNING_AFTER` updates, a warning when the meta step is still off under the
        library's long-run schedule (``fix``: the front-end's way to give the run's length; ``None``: given)."""
        runtime.sync_buffers(self.module, config.dist_bn)
        self.mentor.update(self.module, updates.num_updates)
        updates.record_update()
        if fix is not None and updates.num_updates == SHORT_RUN_WARNING_AFTER:
            warnings.warn(
                f"MLNT's meta step is still off after {updates.num_updates} updates: the library schedule starts it "
                f"at update {config.ramp_start} and reaches full weight at {config.ramp_end} (long Clothing1M-style "
                f"runs). {fix} so the ramp-up and the mentor's decay fit the run.",
                UserWarning,
                stacklevel=4,
            )

    def state_dict(self, updates: UpdateState) -> dict[str, Any]:
        """The counters, the synthetic labels' generator and the fast step's scale, the mentor's weights: one format
        for the wrapper, the timm task and the adapters' files."""
        return {**updates.state_dict(), **self.objective.state_dict(), "mentor": self.mentor.state_dict()}

    def load_state_dict(self, state: dict[str, Any], updates: UpdateState) -> None:
        """Restore what `state_dict` saved."""
        self.mentor.load_state_dict(state["mentor"])
        updates.load_state_dict(state)
        self.objective.load_state_dict(state)


#: The wrapper and the timm task warn once at this update when the meta step is still off under the library's
#: long-run schedule and they were not told the run's length.
SHORT_RUN_WARNING_AFTER = 100
