"""`MetaCore`: the one object behind every way of running MLNT.

`MetaNoiseWrapper` (which also owns the gradient and the optimizer step), the timm task
(`noisy_meta.timm.MetaNoiseTask`, which leaves the backward and the step to timm's
``train.py``) and, through the wrapper, the Hugging Face and Lightning adapters are shells
around one `MetaCore`: it owns the one config and its refit to the run's length, the mentor,
the meta objective, the fast-weight scope, the schedule (the meta weight of the next update),
the update counters (`UpdateState`), the checks of a batch, the loss on the given labels, the
mentor's update and the one state dict every front-end saves.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .checks import check_batch, check_label_mask, check_outputs
from .compat import make_twice_differentiable, unwrap_model
from .config import RUN_LENGTH_FIELDS, MetaNoiseConfig, run_length_schedule
from .fast_scope import SharedTrunk, WholeModel, make_scope
from .fast_weights import select_fast_params
from .losses import Criterion, resolve_criterion
from .mentor import Mentor
from .meta_objective import MetaObjective
from .runtime import is_dtensor, is_sharded
from .update_state import UpdateState

#: A front-end warns once at this update when the meta step is still off under the library's long-run schedule and
#: it was not told the run's length.
SHORT_RUN_WARNING_AFTER = 100


class MetaCore:
    """The student (unwrapped), its mentor, the meta objective, the fast-weight scope, the schedule and the counters.

    Args:
        model: the student, possibly DDP-wrapped or compiled.
        config: a `MetaNoiseConfig`; ``None``: the library's defaults.
        total_updates: the run's length in optimizer updates (fits the schedule fields left at the library
            defaults, `MetaNoiseConfig.for_run_length`), or ``None`` when not known yet (`fit_run_length`).
        overrides: `MetaNoiseConfig` fields replacing those of ``config`` (they win over the run length).
        shared_seed: ``shared_seed(seed, device)`` gives the synthetic labels' seed, the same on every rank.
        mentor: optional starting mentor with the student's architecture; by default a copy of the student.
        updates: the `UpdateState` to count in (the wrapper's says when a micro-batch ends an update).
        short_run_fix: how the front-end is told the run's length, for the warning when it was not told.
        joint_only: why this front-end cannot run ``update_rule="sequential"`` (two optimizer steps per batch),
            if it cannot: such a config is refused before anything changes.

    The fast parameters are chosen before anything changes the model; the mentor is copied before the student is
    made twice differentiable, so it keeps the faster fused ops.
    """

    def __init__(
        self,
        model: nn.Module,
        config: MetaNoiseConfig | None,
        total_updates: int | None,
        overrides: dict[str, Any],
        shared_seed: Callable[[int | None, torch.device], int],
        mentor: nn.Module | None = None,
        updates: UpdateState | None = None,
        short_run_fix: str = "",
        joint_only: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._given = (config, dict(overrides))
        self._config = config = resolve_config(config, total_updates, overrides)
        if joint_only is not None:
            require_joint_update(config, joint_only)
        self._short_run_fix = short_run_fix if total_updates is None and has_library_schedule(config) else None
        self.module = module = unwrap_model(model)
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        fast_names = select_fast_params(module, config.fast_params)
        #: The student is sharded with FSDP2: the fast weights must be whole, after a shared trunk (`check_sharded`).
        self.sharded = is_sharded(module)
        scope = make_scope(module, config, fast_names)
        if self.sharded:
            check_sharded(module, config, scope, mentor)
            scope.required = True  # a trunk split found inexact at the first meta step is an error, not a fallback
        self.mentor = Mentor(module, config, mentor, sharded=self.sharded)
        #: The ops changed for second order (`noisy_meta.compat.make_twice_differentiable`).
        self.compat_changes: list[str] = [] if config.first_order else make_twice_differentiable(module)
        self.objective = MetaObjective(config, module, self.mentor, shared_seed(config.seed, self.params[0].device))
        self.scope: WholeModel = scope
        self.num_classes: int | None = getattr(module, "num_classes", None)
        self.criterion: Criterion = resolve_criterion(config.criterion)
        #: Where the updates stand: the counters that drive the schedules, accumulating / stepped / skipped.
        self.updates = updates if updates is not None else UpdateState()

    # ------------------------------------------------------------------ the config and the schedule

    @property
    def config(self) -> MetaNoiseConfig:
        """The one resolved config; the mentor and the objective read this one."""
        return self._config

    def fit_run_length(self, total_updates: int) -> MetaNoiseConfig:
        """Refit the schedule fields left at the library defaults to a run of ``total_updates`` updates, as
        ``total_updates=`` at construction would; the mentor's decay and the objective use it from now on."""
        config, overrides = self._given
        self._config = resolve_config(config, total_updates, overrides)
        self.mentor.config = self.objective.config = self._config
        self._short_run_fix = None
        return self._config

    @property
    def meta_weight(self) -> float:
        """The meta-loss weight ``w`` of the next update."""
        return self._config.meta_weight_at(self.updates.num_updates)

    # ------------------------------------------------------------------ a batch

    def check_batch(
        self, inputs: torch.Tensor, targets: torch.Tensor, label_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Refuse a bad batch before anything changes; return the targets as int64 and the label mask as bool."""
        targets = check_batch(inputs, targets, self._config, self.num_classes)
        return targets, check_label_mask(label_mask, targets)

    def check_outputs(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """The model's output must be ``[B, C]`` floating-point logits that the labels fit."""
        check_outputs(outputs, targets, self.num_classes)

    def label_loss(
        self, logits: torch.Tensor, targets: torch.Tensor, label_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss on the given labels (``config.criterion``) on the samples ``label_mask`` keeps (all when ``None``;
        0 with the graph kept when it keeps none)."""
        self.check_outputs(logits, targets)
        if label_mask is None:
            return self.criterion(logits, targets)
        if not bool(label_mask.any()):
            return logits.sum() * 0.0
        return self.criterion(logits[label_mask], targets[label_mask])

    # ------------------------------------------------------------------ after an update

    def advance_mentor(self, runtime: Any) -> None:
        """After an optimizer update: BatchNorm statistics equal on all ranks (``dist_bn``), the mentor's EMA, the
        counter; once, at `SHORT_RUN_WARNING_AFTER` updates, a warning when the meta step is still off under the
        library's long-run schedule and the run's length was never given."""
        runtime.sync_buffers(self.module, self._config.dist_bn)
        self.mentor.update(self.module, self.updates.num_updates)
        self.updates.record_update()
        config = self._config
        if self._short_run_fix is not None and self.updates.num_updates == SHORT_RUN_WARNING_AFTER:
            warnings.warn(
                f"MLNT's meta step is still off after {self.updates.num_updates} updates: the library schedule starts "
                f"it at update {config.ramp_start} and reaches full weight at {config.ramp_end} (long "
                f"Clothing1M-style runs). {self._short_run_fix} so the ramp-up and the mentor's decay fit the run.",
                UserWarning,
                stacklevel=4,
            )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The counters, the synthetic labels' generator and the fast step's scale, the mentor's weights: one format
        for the wrapper, the timm task and the adapters' files."""
        return {**self.updates.state_dict(), **self.objective.state_dict(), "mentor": self.mentor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved."""
        self.mentor.load_state_dict(state["mentor"])
        self.updates.load_state_dict(state)
        self.objective.load_state_dict(state)


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


def check_sharded(module: nn.Module, config: MetaNoiseConfig, scope: WholeModel, mentor: nn.Module | None) -> None:
    """Refuse, before anything changes, an FSDP2 student the meta step cannot train exactly.

    Under ``fully_shard`` ``autograd.grad`` never reaches the sharded parameters (FSDP2 gathers them into other
    tensors for each forward and reduces their gradient in its own backward hooks), so the meta step runs ANIL's
    way: the fast weights whole (``fully_shard(..., ignored_params=<them>)``), after a trunk that runs once; the
    meta-gradient at the trunk's output goes back with the loss on the labels in one ordinary backward.
    """
    works = (
        "under FSDP2 use fast_params='head' (or 'last_stage') with those parameters left whole: "
        "noisy_meta.fully_shard_trunk(model, 'head'), or fully_shard(model, ignored_params=<the fast parameters>)"
    )
    sharded = [name for name in scope.fast_names if is_dtensor(module.get_parameter(name))]
    if sharded:
        raise ValueError(f"the fast weights {sharded[:3]} are sharded: second order cannot reach them; {works}")
    if not isinstance(scope, SharedTrunk):
        raise ValueError(f"fast_params={config.fast_params!r} runs the whole sharded model in every fast pass; {works}")
    if config.update_rule != "joint":
        raise ValueError("under FSDP2 the meta step runs with update_rule='joint' only")
    if mentor is None:
        raise ValueError(
            "under FSDP2 the mentor cannot be copied from the student (FSDP does not support deepcopy): pass "
            "mentor=<a copy of the student taken before sharding, sharded the same way (fully_shard_trunk)>"
        )


def require_joint_update(config: MetaNoiseConfig, why: str) -> None:
    """Refuse ``update_rule="sequential"`` where it cannot run; ``why`` names the front-end and the reason."""
    if config.update_rule != "joint":
        raise ValueError(f"{why}: use update_rule='joint' (the default)")


def has_library_schedule(config: MetaNoiseConfig) -> bool:
    """Whether the meta step is on and every schedule field is the library's long-run default."""
    return config.meta_weight > 0 and all(at_library_default(config, name) for name in RUN_LENGTH_FIELDS)


def at_library_default(config: MetaNoiseConfig, name: str) -> bool:
    return getattr(config, name) == MetaNoiseConfig.__dataclass_fields__[name].default
