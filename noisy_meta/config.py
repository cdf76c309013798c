"""`MetaNoiseConfig`: every knob of the MLNT meta step, validated when it is built."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin, get_type_hints

#: The named `fast_params` modes (a sequence of strings is glob patterns instead).
FastParamsName = Literal["all", "last_stage", "head"]

# ``FastParamsSpec``: what selects the parameters that get fast weights: ``"all"``,
# ``"last_stage"`` (timm models: the last feature stage of ``feature_info`` and everything after
# it, final norms and head), ``"head"`` (the timm classifier, ``model.get_classifier()``), a
# sequence of glob patterns matched against parameter names (``["layer4.*", "fc.*"]``), or a
# predicate ``(name, param) -> bool``.
# ``FeatureSourceSpec``: where the neighbour-search features come from: ``"mentor"``,
# ``"student"``, a frozen ``nn.Module`` (e.g. a separately trained cross-entropy network, as in
# the reference code), or a callable ``inputs -> features [B, D]``.
#
# This module does not import torch at run time, so that the command line's parser (built from
# these fields) answers --help without loading it; type checkers see the precise aliases.
if TYPE_CHECKING:
    import torch
    from torch import nn

    FastParamsSpec = FastParamsName | Sequence[str] | Callable[[str, nn.Parameter], bool]
    FeatureSourceSpec = Literal["mentor", "student"] | nn.Module | Callable[[torch.Tensor], torch.Tensor]
else:
    FastParamsSpec = FastParamsName | Sequence[str] | Callable[..., bool]
    FeatureSourceSpec = Literal["mentor", "student"] | Callable[..., Any]  # an nn.Module is callable

#: How the fast-weight step is sized (`noisy_meta.fast_weights.InnerStep`).
InnerStepKind = Literal["sgd", "normalized", "relative", "global_relative", "adaptive"]
#: The losses on the given labels known by name (`noisy_meta.losses`); a callable is accepted too.
CriterionName = Literal["cross_entropy", "label_smoothing", "gce", "sce"]
CriterionSpec = CriterionName | Callable[..., Any]

MentorUpdate = Literal["ema", "frozen"]
UpdateRule = Literal["joint", "sequential"]
#: ``MetaNoiseConfig.compensate_meta_every``: ``True`` (x ``meta_every``), ``"sqrt"`` or ``False`` (x 1).
MetaEveryCompensation = bool | Literal["sqrt"]
DistBN = Literal["reduce", "broadcast"]

#: The named `fast_params` modes.
FAST_PARAM_NAMES: tuple[str, ...] = get_args(FastParamsName)
#: The fast weights that can stay whole after a sharded (FSDP2) trunk: a suffix of the model (`fully_shard_trunk`).
SHARDABLE_FAST_PARAMS: tuple[str, ...] = ("head", "last_stage")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class MetaNoiseConfig:
    """Hyper-parameters of MLNT (Li et al., CVPR 2019). Defaults follow the reference code.

    Synthetic noisy labels
        num_synthetic: M, synthetic noisy label sets (one fast-weight step each) per iteration.
            ``0`` is the ablation without the meta step: no synthetic labels and no fast
            weights, the "meta" loss is the consistency ``KL(mentor || student)`` at the
            student's own weights (an EMA-mentor consistency baseline, same schedules).
        perturb_ratio: rho, fraction of the batch whose label is replaced by the label of a
            random one of its ``num_neighbors`` nearest neighbours (``round(rho * B)``
            positions, rounding half up). A neighbour often shares the label, so fewer labels
            actually change: the wrapper reports the realised fraction as ``labels_changed``.
        num_neighbors: k, nearest neighbours (self excluded) a label may come from. A batch
            needs at least ``k + 1`` samples.
        feature_source: features for the neighbour search (see `FeatureSourceSpec`). timm
            models give their pooled pre-logits features; other models their outputs.

    Fast weights and the meta-gradient
        inner_step: how the fast-weight step is sized (`noisy_meta.fast_weights.InnerStep`):
            ``"sgd"`` (the paper: ``theta - inner_lr * g``), ``"normalized"`` (the fast
            weights move by the radius ``inner_radius`` along ``g / ||g||``, one norm over all
            fast parameters), ``"relative"`` (each tensor moves by ``inner_radius`` times its
            own norm along its ``g_t / ||g_t||``), ``"global_relative"`` (all fast weights
            together move by ``inner_radius * ||theta||`` along ``g / ||g||``: scale-free like
            ``"relative"``, but each tensor's share of the step follows its gradient, as SGD's
            does, so a tensor with almost no gradient is not pushed as far as the others) or
            ``"adaptive"`` (ASAM's ``inner_radius * T^2 g / ||T g||``, ``T = |theta| + 0.01``
            on weight tensors: invariant to a layer's scale). Every parameter-space size moves
            different models' predictions by different amounts; ``inner_divergence`` sizes the
            step in the predictions instead.
        inner_lr: alpha, the step size of the SGD step (``inner_step="sgd"``). The reference
            uses 0.02 on Clothing1M, CIFAR re-implementations 0.2.
        inner_radius: the size of the ``"normalized"`` step (an L2 length in parameter space)
            or of the relative steps (a fraction of each tensor's norm, or of all fast
            weights' norm), or of the adaptive one.
        inner_divergence: size the fast step where the meta loss feels it, in the
            predictions: the mean ``KL(student || fast-weight student)`` on the meta batch
            that each meta step's fast step should cause. Each meta step measures it in
            no-grad trial forwards (one in the steady state) and rescales the step by the
            quadratic law (`noisy_meta.fast_weights.FastStepSize`); ``inner_lr`` /
            ``inner_radius`` is only the first trial's size. A batch that would need a step
            longer than half the fast weights' norm, or whose step overshoots the target 4x,
            is skipped and counted. ``None``: the size is ``inner_lr`` / ``inner_radius`` as
            configured.
        first_order: drop the second-order term (detach the inner gradient). Cheaper, and
            works with ops that have no double backward.
        fast_params: which parameters get fast weights (see `FastParamsSpec`). The others
            keep their value in the fast forward but still receive the meta-gradient.
        meta_every: run the meta step on every N-th update only (the others are plain
            cross-entropy updates); 1 runs it on every update. Cost falls about N-fold. The
            meta gradient is not rescaled unless ``compensate_meta_every``, so the meta
            loss's average weight is ``meta_weight / meta_every``.
        compensate_meta_every: what the meta weight is multiplied by on the updates that run
            the meta step. ``True``: ``meta_every``, so that its average weight over updates
            stays ``meta_weight`` (what `fast` and `finetune` use); the meta gradient's variance
            then grows ``meta_every``-fold (one set's noise, ``meta_every`` times as loud, once
            per cycle). ``"sqrt"``: ``sqrt(meta_every)``, which keeps that noise, summed over a
            cycle, at what one set on every update would give, the average weight falling to
            ``meta_weight / sqrt(meta_every)``; how each compares, from scratch and fine-tuning,
            is in the docs' benchmarks page. ``False``: 1, ``meta_every`` also weakens the meta loss.
        meta_batch_fraction: the fraction of the batch the meta step runs on: a random
            subset (drawn with the synthetic labels' generator) of
            ``max(num_neighbors + 1, round(fraction * B))`` samples, at most the batch, gets
            the mentor's predictions, the neighbour search, the synthetic labels and the
            fast-weight passes; the cross-entropy still uses the whole batch. The meta step's
            cost falls about in proportion on a CPU (less on a GPU with small batches), and
            its fast passes normalise with the subset's BatchNorm statistics. ``1.0`` (the
            default, the paper) uses the whole batch and draws nothing. The inner gradient of
            a subset is noisier (small subsets made the from-scratch benchmark erratic or
            diverge, benchmarks/RESULTS.md): pair a fraction below 1 with a smaller ``inner_lr``.
        sets_per_pass: how many synthetic sets are processed together. 1 (the default) runs
            them one after the other with one set's graph in memory, so memory does not grow
            with M. A larger value computes that many sets' inner gradients in one batched
            vector-Jacobian product (``autograd.grad(..., is_grads_batched=True)``) and their
            fast forwards in one ``torch.func.vmap`` (each set with its own BatchNorm batch
            statistics, the student's running statistics untouched): fewer, larger kernels,
            at the price of holding that many graphs at once. Same result up to rounding. It
            is meant for GPUs, where one set's passes leave the device idle; on a 2-core CPU
            it measured slower (see benchmarks/RESULTS.md). The model must work under
            ``vmap`` (timm models do).

    The conventional loss
        criterion: the loss on the given labels, ``(logits, targets) -> scalar``:
            ``"cross_entropy"`` (the paper), ``"label_smoothing"`` (0.1), ``"gce"``
            (generalised cross-entropy, q = 0.7), ``"sce"`` (symmetric cross-entropy, alpha
            0.1, beta 1.0), an instance of `noisy_meta.losses` with other settings, or any
            callable such as timm's ``LabelSmoothingCrossEntropy()``. The fast-weight step
            always uses plain cross-entropy on the synthetic labels (the paper's inner loss).

    Schedules (in optimizer updates, counted by the wrapper)
        meta_weight: the meta loss weight once the ramp-up is over.
        ramp_start, ramp_end: the meta step is off before ``ramp_start``; between the two the
            weight is ``meta_weight * exp(-5 (1 - u)^2)`` with ``u`` going linearly from 0 to 1;
            from ``ramp_end`` on it is ``meta_weight``. ``ramp_start == ramp_end == 0`` means
            the full weight from the first step.
        mentor_decay_ramp, mentor_decay: EMA decay of the mentor before and after ``ramp_end``.
        mentor_warmup: warm the decay up as timm's ``ModelEmaV3(use_warmup=True)`` does: the
            decay of update ``t`` is at most ``1 - (1 + t) ** (-2/3)`` (0 at the first update,
            0.9 at update 30, 0.99 at update 1,000), so the mentor is never mostly its initial
            weights, whatever the schedule and the run's length. ``False``: the scheduled decays
            from the first update (the reference code), which leave a short run's mentor a blend
            with the random initialisation.
        mentor_update: ``"ema"`` (the mentor is an exponential moving average of the student,
            parameters and buffers) or ``"frozen"`` (a mentor you pass in stays as it is, e.g.
            the best mentor of a previous run in iterative training).

    Update rule
        update_rule: ``"joint"`` (the reference code: one optimizer step on
            ``grad CE + w * grad J``) or ``"sequential"`` (the paper's notation: an optimizer
            step on ``w * grad J``, then a fresh forward and an optimizer step on ``grad CE``).

    Applying the update
        clip_grad: clip the global gradient norm (after unscaling, after the all-reduce) to
            this value before each optimizer step; ``None`` does not clip.
        dist_bn: with several processes, how BatchNorm statistics (which each rank updates
            from its own data) are made equal on all ranks after each update: ``"reduce"``
            averages them (timm's default), ``"broadcast"`` copies rank 0's (what DDP does).

    Reproducibility
        seed: seeds the ``torch.Generator`` that draws the synthetic labels. ``None`` derives
            one from PyTorch's global seed (``torch.initial_seed()``, which ``torch.manual_seed``
            and the frameworks' ``set_seed`` set) without drawing from the global RNG, so
            building the meta step never shifts a run's random augmentation or shuffling. With
            several processes every rank uses rank 0's seed.
    """

    num_synthetic: int = 10
    perturb_ratio: float = 0.5
    num_neighbors: int = 10
    feature_source: FeatureSourceSpec = "mentor"
    inner_step: InnerStepKind = "sgd"
    inner_lr: float = 0.2
    inner_radius: float = 0.01
    inner_divergence: float | None = None
    first_order: bool = False
    fast_params: FastParamsSpec = "all"
    meta_every: int = 1
    compensate_meta_every: MetaEveryCompensation = False
    meta_batch_fraction: float = 1.0
    sets_per_pass: int = 1
    meta_weight: float = 1.0
    ramp_start: int = 500
    ramp_end: int = 2000
    mentor_decay_ramp: float = 0.99
    mentor_decay: float = 0.999
    mentor_update: MentorUpdate = "ema"
    mentor_warmup: bool = True
    criterion: CriterionSpec = "cross_entropy"
    update_rule: UpdateRule = "joint"
    clip_grad: float | None = None
    dist_bn: DistBN = "reduce"
    seed: int | None = None

    def __post_init__(self) -> None:
        errors = list(self._errors())
        if errors:
            raise ValueError("invalid MetaNoiseConfig: " + "; ".join(errors))

    def _errors(self):
        if not _is_int(self.num_synthetic) or self.num_synthetic < 0:
            yield f"num_synthetic must be an integer >= 0 (0: consistency only), got {self.num_synthetic!r}"
        for name in ("num_neighbors", "meta_every", "sets_per_pass"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                yield f"{name} must be an integer >= 1, got {value!r}"
        if not _is_real(self.perturb_ratio) or not 0 < self.perturb_ratio <= 1:
            yield f"perturb_ratio must be in (0, 1], got {self.perturb_ratio!r}"
        for name in ("inner_lr", "inner_radius"):
            if not _is_real(getattr(self, name)) or getattr(self, name) <= 0:
                yield f"{name} must be a finite number > 0, got {getattr(self, name)!r}"
        if self.inner_divergence is not None and (not _is_real(self.inner_divergence) or self.inner_divergence <= 0):
            yield f"inner_divergence must be a finite number > 0 or None, got {self.inner_divergence!r}"
        if not _is_real(self.meta_weight) or self.meta_weight < 0:
            yield f"meta_weight must be a finite number >= 0, got {self.meta_weight!r}"
        for name in ("first_order", "mentor_warmup"):
            if not isinstance(getattr(self, name), bool):
                yield f"{name} must be a bool, got {getattr(self, name)!r}"
        if not (isinstance(self.compensate_meta_every, bool) or self.compensate_meta_every == "sqrt"):
            yield f"compensate_meta_every must be True, False or 'sqrt', got {self.compensate_meta_every!r}"
        if not _is_real(self.meta_batch_fraction) or not 0 < self.meta_batch_fraction <= 1:
            yield f"meta_batch_fraction must be in (0, 1], got {self.meta_batch_fraction!r}"
        for name in ("ramp_start", "ramp_end"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                yield f"{name} must be an integer >= 0, got {value!r}"
        if _is_int(self.ramp_start) and _is_int(self.ramp_end) and self.ramp_end < self.ramp_start:
            yield f"ramp_end ({self.ramp_end}) must not come before ramp_start ({self.ramp_start})"
        for name in ("mentor_decay_ramp", "mentor_decay"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value < 1:
                yield f"{name} must be in [0, 1), got {value!r}"
        for name in ("inner_step", "mentor_update", "update_rule", "dist_bn"):
            value, choices = getattr(self, name), field_choices(name)
            if value not in choices:
                yield f"{name} must be one of {choices}, got {value!r}"
        if self.clip_grad is not None and (not _is_real(self.clip_grad) or self.clip_grad <= 0):
            yield f"clip_grad must be a finite number > 0 or None, got {self.clip_grad!r}"
        if self.seed is not None and not _is_int(self.seed):
            yield f"seed must be an integer or None, got {self.seed!r}"
        yield from _spec_errors("fast_params", self.fast_params, FAST_PARAM_NAMES, allow_patterns=True)
        yield from _spec_errors("feature_source", self.feature_source, field_choices("feature_source"))
        yield from _spec_errors("criterion", self.criterion, field_choices("criterion"))

    def with_overrides(self, **overrides: Any) -> MetaNoiseConfig:
        """A copy with ``overrides`` applied (validated); unknown names raise ``TypeError``."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(
                f"unknown MetaNoiseConfig field(s): {', '.join(unknown)}; valid fields: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(self, **overrides)

    @classmethod
    def for_run_length(cls, total_updates: int, **overrides: Any) -> MetaNoiseConfig:
        """A config whose schedules fit a run of ``total_updates`` optimizer updates.

        The library defaults (meta step from update 500 to 2000, mentor decay 0.99 / 0.999)
        suit long Clothing1M runs; on a few hundred updates they leave the meta step off and
        the mentor lagging far behind. Here the meta weight ramps up over 10%-40% of the run
        and the mentor averages over about 2% of it during the ramp and 5% after (decays
        clamped to [0.8, 0.99] and [0.9, 0.999]). ``overrides`` win over all of these.
        """
        return cls().with_overrides(**{**run_length_schedule(total_updates), **overrides})

    @classmethod
    def fast(cls, **overrides: Any) -> MetaNoiseConfig:
        """The affordable preset: about twice the cost of a cross-entropy step (see `FAST_PRESET`).

        ``overrides`` win over the preset. To make a config of your own cheap instead, use
        ``config.with_overrides(**FAST_PRESET)``.
        """
        return cls().with_overrides(**{**FAST_PRESET, **overrides})

    @classmethod
    def finetune(cls, **overrides: Any) -> MetaNoiseConfig:
        """The fine-tuning recipe for a pretrained model (see `FINETUNE_PRESET`).

        The affordable preset's cost (one synthetic set on every 5th update) with the
        scale-free relative fast step (every tensor moves by 0.3% of its norm, whatever the
        learning rate). The fast step sized in the predictions
        (``inner_step="normalized", inner_divergence=0.1``) gained far more on the fine-tuning
        benchmark's ResNet and collapsed its ViT in short runs, so it is an override, not the
        recipe; how both compare with cross-entropy, GCE, early stopping and detection before
        training is in the docs' benchmarks page. ``overrides`` win over the preset.
        """
        return cls().with_overrides(**{**FINETUNE_PRESET, **overrides})

    def meta_weight_at(self, step: int) -> float:
        """Meta-loss weight ``w`` for the update with index ``step`` (0-based)."""
        if step < self.ramp_start or step % self.meta_every:
            return 0.0
        weight = self.meta_weight * self.meta_step_factor
        if step >= self.ramp_end:
            return float(weight)
        u = (step - self.ramp_start) / (self.ramp_end - self.ramp_start)
        return float(weight * math.exp(-5.0 * (1.0 - u) ** 2))

    @property
    def meta_step_factor(self) -> float:
        """What the meta weight is multiplied by on the updates that run the meta step (see
        ``compensate_meta_every``): ``meta_every``, its square root or 1."""
        if self.compensate_meta_every == "sqrt":
            return math.sqrt(self.meta_every)
        return float(self.meta_every) if self.compensate_meta_every else 1.0

    def meta_batch_size(self, batch_size: int) -> int:
        """Samples the meta step runs on for a batch of ``batch_size`` (see ``meta_batch_fraction``)."""
        wanted = math.floor(self.meta_batch_fraction * batch_size + 0.5)
        return min(batch_size, max(self.num_neighbors + 1, wanted))

    def mentor_decay_at(self, step: int, warmup: bool | None = None) -> float:
        """EMA decay of the mentor for the update with index ``step`` (0-based).

        ``warmup``: whether the warm-up applies (default ``mentor_warmup``; a mentor passed in,
        not a copy of the initial student, is averaged without it).
        """
        decay = self.mentor_decay_ramp if step < self.ramp_end else self.mentor_decay
        if self.mentor_warmup if warmup is None else warmup:
            decay = min(decay, 1.0 - (1.0 + step) ** (-2.0 / 3.0))
        return float(decay)


#: The affordable preset (`MetaNoiseConfig.fast`): one synthetic set, second order, on the
#: whole batch, on every 5th update with the meta weight compensated (5x on those updates).
#: Measured in benchmarks/RESULTS.md ("The affordable preset").
FAST_PRESET: dict[str, Any] = {
    "num_synthetic": 1,
    "first_order": False,
    "meta_every": 5,
    "compensate_meta_every": True,
    "meta_batch_fraction": 1.0,
}

#: The fine-tuning recipe (`MetaNoiseConfig.finetune`): the affordable preset's schedule of meta
#: steps with the scale-free relative fast step (0.3% of each tensor's norm). The fast step sized in
#: the predictions, picked on the long regime's noisy validation split, collapsed the benchmark's ViT
#: in short runs (noisy validation shows it too) and stays an override (benchmarks/RESULTS.md,
#: "Fine-tuning a pretrained model").
FINETUNE_PRESET: dict[str, Any] = {
    **FAST_PRESET,
    "inner_step": "relative",
    "inner_radius": 0.003,
}
#: The default of the adapters for training loops of other libraries (`noisy_meta.timm.MetaNoiseTask`,
#: `noisy_meta.hf.MetaNoiseTrainer`, `noisy_meta.lightning.MetaNoiseCallback`): the fine-tuning recipe
#: with the meta weight not compensated on the meta steps: the 5x weight of every 5th update made the
#: training loss spike at the end of the warm-up of timm's own ``train.py`` (benchmarks/RESULTS.md,
#: "MLNT inside timm's train.py").
LOOP_DEFAULTS: dict[str, Any] = {**FINETUNE_PRESET, "compensate_meta_every": False}

#: The fields `MetaNoiseConfig.for_run_length` sets from the run length.
RUN_LENGTH_FIELDS = ("ramp_start", "ramp_end", "mentor_decay_ramp", "mentor_decay")


def run_length_schedule(total_updates: int) -> dict[str, Any]:
    """The schedules (`RUN_LENGTH_FIELDS`) for a run of ``total_updates`` optimizer updates."""
    if not _is_int(total_updates) or total_updates < 1:
        raise ValueError(f"total_updates must be an integer >= 1, got {total_updates!r}")
    return {
        "ramp_start": round(0.1 * total_updates),
        "ramp_end": round(0.4 * total_updates),
        "mentor_decay_ramp": min(0.99, max(0.8, 1.0 - 50.0 / total_updates)),
        "mentor_decay": min(0.999, max(0.9, 1.0 - 20.0 / total_updates)),
    }


@functools.cache
def field_choices(name: str) -> tuple[str, ...]:
    """The named values a `MetaNoiseConfig` field accepts, read from its ``Literal`` type (``()``: none)."""
    return _literal_args(get_type_hints(MetaNoiseConfig)[name])


def _literal_args(hint: Any) -> tuple[str, ...]:
    if get_origin(hint) is Literal:
        return get_args(hint)
    return tuple(arg for member in get_args(hint) if get_origin(member) is Literal for arg in get_args(member))


def _spec_errors(name: str, value: Any, names: tuple[str, ...], allow_patterns: bool = False):
    if isinstance(value, str):
        if value not in names:
            yield f"{name} must be one of {names} or a callable, got {value!r}"
    elif allow_patterns and isinstance(value, Sequence):
        if not value or not all(isinstance(p, str) and p for p in value):
            yield f"{name} as a sequence must hold non-empty glob patterns, got {value!r}"
    elif not callable(value):
        kinds = f"one of {names}, " + ("a sequence of glob patterns, " if allow_patterns else "")
        yield f"{name} must be {kinds}or a callable, got {value!r}"
