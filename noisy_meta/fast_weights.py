"""Fast weights: one step per synthetic label set, and the meta loss that follows it.

For set m the fast weights are ``theta'_m = theta - step(grad_theta CE(f(x; theta), y_m))``
(only for the selected parameters; `InnerStep` says how large the step is), and the meta loss
is the KL divergence from the mentor's predictions to the student's predictions at
``theta'_m``. The fast forward goes through
`torch.func.functional_call` on the real module with *cloned* buffers, so BatchNorm running
statistics and ``num_batches_tracked`` of the student are never touched by it.

Sets run one at a time (one set's graph in memory) or several per pass: their inner gradients
in one batched vector-Jacobian product, their fast forwards in one `torch.func.vmap`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from .config import FastParamsSpec, InnerStepKind

if TYPE_CHECKING:
    from .config import MetaNoiseConfig

#: Added to a squared norm before its square root: the step stays finite (and twice
#: differentiable) for a gradient or a tensor that is exactly zero.
_NORM_FLOOR = 1e-24
#: ASAM's ``eta``: the floor of the adaptive step's per-weight scale ``|theta| + eta``.
ADAPTIVE_ETA = 0.01
#: The largest fast step `FastStepSize` takes, as ``||theta' - theta|| / ||theta||``: a batch whose
#: target divergence asks for more (or whose step moves the predictions not at all) is clipped to
#: it, counted, and its meta step skipped.
MAX_RELATIVE_STEP = 0.5
#: `FastStepSize` takes up to this many no-grad trials per meta step (one when its scale is already near the
#: target's: the steady state), stopping once a rescale changes the radius by less than `TRIAL_TOLERANCE` x.
MAX_TRIALS = 4
TRIAL_TOLERANCE = 1.25
#: A fast step whose realised divergence (measured on the step it trains on) exceeds the target this many times is
#: not trained on either: the trials' law failed far from where they measured it (seen on a collapsing model).
MAX_OVERSHOOT = 4.0
#: A measured divergence below this is float rounding (float32 KL of two nearly equal distributions).
DIVERGENCE_FLOOR = 1e-7


@dataclass(frozen=True)
class InnerStep:
    """The fast-weight step ``theta' = theta - delta(g)`` for the inner gradient ``g`` of the fast parameters.

    ``kind`` (`MetaNoiseConfig.inner_step`):

    * ``"sgd"`` (the paper): ``delta = size * g``. Its length ``size * ||g||`` depends on the
      architecture, the loss and the data, so no one ``size`` fits every model.
    * ``"normalized"``: ``delta = size * g / ||g||``, ``||g||`` over all fast parameters
      together (SAM's ascent step): the fast weights move by exactly ``size`` (an L2 radius).
    * ``"relative"``: each tensor ``t`` moves by ``size * ||theta_t||`` along ``g_t / ||g_t||``
      (LARS's per-layer trust ratio): every tensor moves by the same fraction ``size`` of its
      own norm, so the whole step is ``size * ||theta||`` long, whatever the model's scale. A
      tensor that is exactly zero (a fresh bias) stays (its norm is floored at 1e-12). A tensor
      with almost no gradient is pushed as far as the others, along a direction that is mostly
      noise.
    * ``"global_relative"``: ``delta = size * ||theta|| * g / ||g||``, both norms over all fast
      parameters together: the step is ``size * ||theta||`` long, whatever the model's or the
      gradient's scale, and shared among the tensors as SGD shares it.
    * ``"adaptive"`` (ASAM's step, Kwon et al. 2021): ``delta = size * T^2 g / ||T g||`` with
      ``T = |theta| + 0.01`` on weight tensors (two or more dimensions) and ``T = 1`` on biases
      and norm gains, the norm over all fast parameters together: invariant to rescaling a
      layer's weights, and a tensor with almost no gradient moves almost not at all.

    In second order the norms are differentiated like the rest of the step (the meta-gradient
    is the exact gradient of the meta loss the forward computes); ``first_order`` detaches the
    whole step, so ``d theta' / d theta`` is the identity.
    """

    kind: InnerStepKind = "sgd"
    size: float = 0.2
    first_order: bool = False

    @classmethod
    def of(cls, config: MetaNoiseConfig) -> InnerStep:
        """The step a `MetaNoiseConfig` asks for (``inner_lr`` for SGD, ``inner_radius`` otherwise)."""
        size = config.inner_lr if config.inner_step == "sgd" else config.inner_radius
        return cls(config.inner_step, size, config.first_order)

    def __call__(self, params: list[torch.Tensor], grads: list[torch.Tensor], batched: bool) -> list[torch.Tensor]:
        """The stepped tensors. With ``batched`` every gradient has a leading set dimension ``[S, ...]``
        (each set normalised on its own) and every parameter a leading dimension of 1."""
        if self.first_order:
            grads = [g.detach() for g in grads]
        if self.kind == "sgd":
            deltas = [self.size * g for g in grads]
        elif self.kind == "normalized":
            total = sum(_squared_norm(g, batched) for g in grads)
            scale = self.size * (total + _NORM_FLOOR).rsqrt()
            deltas = [_times(scale, g, batched) for g in grads]
        elif self.kind == "adaptive":
            scales = [_adaptive_scale(p, batched) for p in params]
            total = sum(_squared_norm(t * g, batched) for t, g in zip(scales, grads))
            scale = self.size * (total + _NORM_FLOOR).rsqrt()
            deltas = [_times(scale, t.square() * g, batched) for t, g in zip(scales, grads)]
        elif self.kind == "global_relative":
            norm_p, norm_g = (sum(_squared_norm(t, batched) for t in ts) + _NORM_FLOOR for ts in (params, grads))
            scale = self.size * norm_p.sqrt() * norm_g.rsqrt()
            deltas = [_times(scale, g, batched) for g in grads]
        else:
            deltas = []
            for p, g in zip(params, grads):
                norm_p, norm_g = (_squared_norm(t, batched) + _NORM_FLOOR for t in (p, g))
                ratio = norm_p.sqrt() * norm_g.rsqrt()
                deltas.append(_times(self.size * ratio, g, batched))
        if self.first_order:
            deltas = [d.detach() for d in deltas]
        return [p - d for p, d in zip(params, deltas)]

    def displacement(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> float:
        """``||theta' - theta|| / ||theta||`` for one set's gradients (what the step does to this model)."""
        with torch.no_grad():
            stepped = InnerStep(self.kind, self.size, True)(params, grads, batched=False)
            moved = sum(float((s - p).square().sum()) for s, p in zip(stepped, params))
            norm = sum(float(p.square().sum()) for p in params)
        return (moved / max(norm, _NORM_FLOOR)) ** 0.5


def _adaptive_scale(param: torch.Tensor, batched: bool) -> torch.Tensor:
    """ASAM's ``T``: ``|theta| + eta`` on a weight tensor (not differentiated), 1 on a bias or norm gain."""
    if param.dim() - int(batched) < 2:
        return torch.ones((), dtype=param.dtype, device=param.device)
    return param.detach().abs() + ADAPTIVE_ETA


def _squared_norm(tensor: torch.Tensor, batched: bool) -> torch.Tensor:
    """``||tensor||^2`` (per set along dimension 0 when ``batched``), in float32 or wider."""
    tensor = upcast(tensor)
    if not batched:
        return tensor.square().sum()
    return tensor.square().flatten(1).sum(dim=1)


def _times(scale: torch.Tensor, tensor: torch.Tensor, batched: bool) -> torch.Tensor:
    """``scale * tensor`` with one scale per set when ``batched``, in ``tensor``'s dtype."""
    if batched and scale.dim() == 1:
        scale = scale.reshape(-1, *([1] * (tensor.dim() - 1)))
    return (scale * tensor).to(tensor.dtype)


def select_fast_params(module: nn.Module, spec: FastParamsSpec) -> list[str]:
    """Names of the trainable parameters of ``module`` that get fast weights under ``spec``."""
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if spec == "all":
        selected = [name for name, _ in named]
    elif spec == "head":
        get_classifier = getattr(module, "get_classifier", None)
        if not callable(get_classifier):
            raise ValueError(
                "fast_params='head' needs a timm model (one with get_classifier()); "
                "pass glob patterns or a predicate (name, param) -> bool instead"
            )
        head_ids = {id(p) for p in get_classifier().parameters()}
        selected = [name for name, p in named if id(p) in head_ids]
    elif spec == "last_stage":
        selected = _from_last_stage(module, [name for name, _ in named])
    elif callable(spec):
        selected = [name for name, p in named if spec(name, p)]
    else:
        selected = [name for name, _ in named if any(fnmatch.fnmatchcase(name, pat) for pat in spec)]
    if not selected:
        raise ValueError(f"fast_params={spec!r} selects no trainable parameter of the model")
    return selected


def last_stage_name(module: nn.Module) -> str:
    """The name in ``module`` of a timm model's last feature stage (the last entry of its ``feature_info``).

    A PEFT model (LoRA) is looked through: its timm model's stage, under PEFT's prefix.
    """
    base = module.get_base_model() if callable(getattr(module, "get_base_model", None)) else module
    feature_info = getattr(base, "feature_info", None)
    stages = [info.get("module") for info in feature_info or [] if isinstance(info, dict)]
    if not stages or not stages[-1]:
        raise ValueError(
            "fast_params='last_stage' needs a timm model that declares its stages (feature_info); "
            "pass glob patterns or a predicate (name, param) -> bool instead"
        )
    prefix = next(name for name, submodule in module.named_modules() if submodule is base)
    return f"{prefix}.{stages[-1]}" if prefix else stages[-1]


def _from_last_stage(module: nn.Module, names: list[str]) -> list[str]:
    """Parameters from the start of the last feature stage (timm's ``feature_info``) to the head."""
    stage = last_stage_name(module)
    prefix = stage + "."
    start = next((i for i, name in enumerate(names) if name.startswith(prefix)), None)
    if start is None:
        raise ValueError(f"fast_params='last_stage': no trainable parameter under the last stage {stage!r}")
    return names[start:]  # timm registers modules in forward order: the stage, final norms, head


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 when it is half precision (losses are computed in float32)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def kl_to_mentor(student_logits: torch.Tensor, mentor_log_probs: torch.Tensor) -> torch.Tensor:
    """``KL(mentor || student)`` per sample, averaged over the batch.

    ``student_logits`` is ``[B, C]`` (a scalar comes back) or ``[S, B, C]`` for S fast-weight
    students at once (``[S]`` comes back); ``mentor_log_probs`` is ``[B, C]``.
    """
    log_probs = F.log_softmax(upcast(student_logits), dim=-1)
    per_class = mentor_log_probs.exp() * (mentor_log_probs - log_probs)
    return per_class.sum(dim=(-2, -1)) / log_probs.shape[-2]


class FastStepSize:
    """Sizes each meta step's fast step in the predictions, and measures what every fast step did.

    What the meta loss feels is how far a fast step moves the student's *predictions*: to second
    order ``KL(f(theta) || f(theta')) ~ (1/2) delta^T F delta`` (``F`` the Fisher information of
    the predictions), so one parameter-space radius moves a ViT's outputs much further than a
    ResNet's. With a ``target`` (`MetaNoiseConfig.inner_divergence`) each meta step first takes
    the step at the current ``scale`` (times the configured ``inner_lr`` / ``inner_radius``) in a
    no-grad trial forward, measures the mean ``KL(student || fast-weight student)`` on the meta
    batch and rescales by the quadratic law, ``scale * sqrt(target / measured)``; while that
    changes the radius by more than `TRIAL_TOLERANCE` x it tries again at the new radius (up to
    `MAX_TRIALS`, from the second trial on with the power law the last two trials measured).
    The step it trains on has the last size (a constant to the meta-gradient). The next meta
    step starts there, so in the steady state one trial lands near the target.

    A batch that would need a step longer than `MAX_RELATIVE_STEP` of the fast weights' norm,
    whose step does not move the predictions at all, or whose step moves them more than
    `MAX_OVERSHOOT` times the target, is not trained on: its meta step is skipped,
    ``num_clipped`` counts it, and the scale is clipped (or kept). With several
    processes the measurement is averaged over ranks first, so every rank uses one scale.

    Without a target the scale stays 1. Either way ``divergence`` and ``relative_step`` hold
    what the last meta step's first synthetic set did: ``KL(student || fast student)`` and
    ``||theta' - theta|| / ||theta||`` over the fast parameters.
    """

    def __init__(self, target: float | None = None) -> None:
        self.target = target
        self.scale = 1.0
        self.num_clipped = 0
        self.divergence: torch.Tensor | None = None
        self.relative_step: torch.Tensor | None = None

    def fit(
        self,
        module: nn.Module,
        params: dict[str, torch.Tensor],
        step: InnerStep,
        grads: _InnerGradients,
        inputs: torch.Tensor,
        logits: torch.Tensor,
    ) -> float | None:
        """The scale of this meta step's fast step (``None``: skip the meta step); trial at `scale`."""
        if self.target is None:
            return 1.0

        @torch.no_grad()
        def trial(scale: float) -> tuple[float, float]:
            """The divergence and relative length of the first set's step at ``scale`` (rank mean)."""
            trial_step = replace(step, size=step.size * scale, first_order=True)
            stepped = grads.first_set(trial_step(grads.params, grads.grads, grads.batched))
            fast_logits = forward_with_cloned_buffers(module, {**params, **stepped}, inputs)
            measured = torch.stack([prediction_divergence(logits, fast_logits), _relative_step(grads, stepped)])
            divergence, relative = _mean_over_ranks(measured).tolist()
            return divergence, relative

        scale, previous = self.scale, None
        for _ in range(MAX_TRIALS):
            divergence, relative = trial(scale)
            if not (math.isfinite(divergence) and math.isfinite(relative) and relative > 0.0):
                return self._clipped(self.scale)  # the step moves nothing (or overflows): keep the scale
            below_rounding = divergence < DIVERGENCE_FLOOR  # float rounding, not a measurement: go up to the cap
            divergence = max(divergence, DIVERGENCE_FLOOR)
            exponent = 2.0  # the quadratic law; from the second trial on, the power law the two trials measured
            if previous is not None and previous[0] != scale and previous[1] != divergence:
                exponent = math.log(divergence / previous[1]) / math.log(scale / previous[0])
                exponent = min(max(exponent, 0.5), 4.0)
            wanted = scale * (self.target / divergence) ** (1.0 / exponent)
            largest = scale * MAX_RELATIVE_STEP / relative
            if wanted >= largest:
                if scale >= largest * (1.0 - 1e-9):  # already at the largest step, and still short of the target
                    return self._clipped(largest)
                wanted = largest
            close = abs(math.log(wanted / scale)) <= math.log(TRIAL_TOLERANCE)
            previous, scale = (None if below_rounding else (scale, divergence)), wanted
            if close:
                break
        self.scale = scale
        return scale

    def _clipped(self, scale: float) -> None:
        self.scale = scale
        self.num_clipped += 1
        return None

    def observe(self, logits: torch.Tensor, fast_logits: torch.Tensor, grads: _InnerGradients, stepped: dict) -> bool:
        """Record what the first set's fast step did (detached; no extra pass); with a target, whether the step may be
        trained on: ``False`` (counted in ``num_clipped``) when it moved the predictions more than `MAX_OVERSHOOT`
        times the target (on any rank: the decision is the ranks' mean)."""
        with torch.no_grad():
            self.divergence = prediction_divergence(logits, fast_logits)
            self.relative_step = _relative_step(grads, grads.first_set(stepped))
            if self.target is None:
                return True
            realised = float(_mean_over_ranks(self.divergence.reshape(1)))
        if math.isfinite(realised) and realised <= MAX_OVERSHOOT * self.target:
            return True
        self.num_clipped += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "num_clipped": self.num_clipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.num_clipped = int(state["num_clipped"])


def prediction_divergence(logits: torch.Tensor, fast_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``KL(softmax(logits) || softmax(fast_logits))`` (both ``[B, C]``)."""
    log_p = F.log_softmax(upcast(logits.detach()), dim=-1)
    log_q = F.log_softmax(upcast(fast_logits.detach()), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


def _relative_step(grads: _InnerGradients, stepped: dict[str, torch.Tensor]) -> torch.Tensor:
    """``||theta' - theta|| / ||theta||`` over the stepped parameters (one set)."""
    params = grads.first_set(dict(zip(grads.names, grads.params)))
    moved = sum(_squared_norm((stepped[n] - params[n]).detach(), False) for n in stepped)
    norm = sum(_squared_norm(params[n].detach(), False) for n in stepped)
    return (moved / (norm + _NORM_FLOOR)).sqrt()


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over the processes of the default group (as they are with one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def meta_losses(
    module: nn.Module,
    inputs: torch.Tensor,
    logits: torch.Tensor,
    synthetic_labels: torch.Tensor,
    mentor_log_probs: torch.Tensor,
    fast_names: list[str],
    inner_step: InnerStep,
    grad_scale: float = 1.0,
    sets_per_pass: int = 1,
    step_size: FastStepSize | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the meta losses ``J_m`` of the synthetic label sets, ``sets_per_pass`` at a time.

    Each yielded tensor holds the losses of one pass, shape ``[S]`` (``S <= sets_per_pass``).
    With no synthetic set (``[0, B]`` labels) it yields one loss, ``KL(mentor || student)``
    on ``logits`` itself: the consistency-only ablation.

    ``logits = module(inputs)`` is the student's output (its graph is reused for every inner
    gradient and must stay alive while the generator runs). Consume one pass's losses before
    asking for the next to keep one pass's graphs in memory at a time. With
    ``sets_per_pass > 1`` a pass computes its sets' inner gradients in one batched
    vector-Jacobian product and their fast forwards in one ``torch.func.vmap``.

    ``inner_step`` takes each set's inner gradient to its fast weights (`InnerStep`);
    ``step_size`` (`FastStepSize`) sizes it in the predictions when it has a target (on the
    first set; every set of the meta step takes that size) and records what it did. When it
    skips the meta step the generator yields nothing.

    ``grad_scale`` (fp16's loss scale, a power of two) multiplies each inner loss before its
    gradient and divides the gradient after, so half-precision backward passes do not
    underflow; an overflow shows up as a non-finite meta loss.
    """
    if synthetic_labels.shape[0] == 0:  # no synthetic set: consistency at the student's own weights
        yield kl_to_mentor(logits, mentor_log_probs).reshape(1)
        return
    step_size = FastStepSize() if step_size is None else step_size
    params = dict(module.named_parameters())
    fast_tensors = [params[name] for name in fast_names]
    scale = None
    for labels in synthetic_labels.split(sets_per_pass):
        one_set = labels.shape[0] == 1
        grads = _inner_gradients(
            logits, labels[0] if one_set else labels, fast_names, fast_tensors, inner_step, grad_scale
        )
        first = scale is None
        if first:
            scale = step_size.fit(module, params, inner_step, grads, inputs, logits)
            if scale is None:
                return
        step = inner_step if scale == 1.0 else replace(inner_step, size=inner_step.size * scale)
        fast = dict(zip(grads.names, step(grads.params, grads.grads, grads.batched)))
        if one_set:
            student = forward_with_cloned_buffers(module, {**params, **fast}, inputs)
        else:
            student = _batched_forward(module, params, fast, inputs, labels.shape[0])
        if first and not step_size.observe(logits, student if one_set else student[0], grads, fast):
            return  # the step overshot its target: no meta step on this batch
        yield kl_to_mentor(student, mentor_log_probs).reshape(-1)


@dataclass
class _InnerGradients:
    """The inner gradients of one pass: the parameters in the graph of the logits, and their gradients.

    With ``batched`` every gradient is ``[S, *p.shape]`` and every parameter ``[1, *p.shape]``.
    """

    names: list[str]
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    batched: bool

    def first_set(self, tensors: dict[str, torch.Tensor] | list[torch.Tensor]) -> Any:
        """The first set's (or only) slice of per-set tensors (a dict by name, or the stepped list)."""
        if isinstance(tensors, list):
            tensors = dict(zip(self.names, tensors))
        return {name: t[0] for name, t in tensors.items()} if self.batched else tensors


def _inner_gradients(
    logits: torch.Tensor,
    labels: torch.Tensor,
    names: list[str],
    params: list[torch.Tensor],
    inner_step: InnerStep,
    grad_scale: float,
) -> _InnerGradients:
    """``grad_p CE(logits, labels)`` for the parameters in the graph of ``logits``.

    ``labels`` is one set ``[B]``, or S sets ``[S, B]`` at once (gradients ``[S, *p.shape]``).
    The S inner losses share ``logits``, so their gradients differ only in the gradient at the
    logits, ``(softmax(logits) - onehot(y_s)) / B`` (cross-entropy's, written out so that it
    stays differentiable for second order); one batched vector-Jacobian product
    (``is_grads_batched``) takes all S back to the parameters.

    The inner loss is multiplied by ``grad_scale`` before its gradient and the gradient divided
    by it after (exact for fp16's power-of-two scales).
    """
    if labels.dim() == 1:
        inner_loss = F.cross_entropy(logits, labels)
        if grad_scale != 1.0:
            inner_loss = inner_loss * grad_scale
        grads = torch.autograd.grad(
            inner_loss, params, create_graph=not inner_step.first_order, retain_graph=True, allow_unused=True
        )
    else:
        batch_size, num_classes = logits.shape
        onehot = F.one_hot(labels, num_classes).to(logits.dtype)
        logits_grads = (logits.softmax(dim=1) - onehot) * (grad_scale / batch_size)
        grads = torch.autograd.grad(
            logits,
            params,
            grad_outputs=logits_grads,
            is_grads_batched=True,
            create_graph=not inner_step.first_order,
            retain_graph=True,
            allow_unused=True,
        )
        params = [p.unsqueeze(0) for p in params]
    # a parameter not in the graph of the logits (no gradient) keeps its value in the fast forward
    used = [(name, p, g) for name, p, g in zip(names, params, grads) if g is not None]
    if grad_scale != 1.0:
        used = [(name, p, g / grad_scale) for name, p, g in used]
    return _InnerGradients([n for n, _, _ in used], [p for _, p, _ in used], [g for _, _, g in used], labels.dim() > 1)


def _batched_forward(
    module: nn.Module,
    params: dict[str, torch.Tensor],
    fast: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    num_sets: int,
) -> torch.Tensor:
    """``[S, B, C]`` logits of S fast-weight students in one ``torch.func.vmap``.

    ``fast`` holds the stepped parameters with a leading set dimension; the others are shared.
    Every set gets its own copy of the buffers, so BatchNorm normalises with each set's batch
    statistics (as the sequential pass does) and the student's running statistics stay as
    they are. Random ops (dropout) draw independently per set.
    """
    shared = {name: p for name, p in params.items() if name not in fast}
    buffers = {name: b.unsqueeze(0).repeat(num_sets, *([1] * b.dim())) for name, b in module.named_buffers()}

    def student(set_params: dict[str, torch.Tensor], set_buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(module, {**shared, **set_params, **set_buffers}, (inputs,))

    try:
        with _batch_norm_in_parameter_dtype(module):
            return vmap(student, randomness="different")(fast, buffers)
    except RuntimeError as error:
        if "vmap" not in str(error):
            raise
        raise RuntimeError(
            f"sets_per_pass > 1 runs the fast forwards under torch.func.vmap, which this model does not "
            f"support ({error}); use sets_per_pass=1"
        ) from error


@contextlib.contextmanager
def _batch_norm_in_parameter_dtype(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers take their input in their running statistics' dtype, and give back the input's.

    CUDA autocast hands BatchNorm bf16/fp16 activations with float32 statistics and affine
    parameters; the plain kernel accepts that mix, ``vmap``'s batching rule for ``batch_norm``
    does not ("Expected running_mean to have type BFloat16"). Normalising in float32 and casting
    back is what the mixed kernel computes.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    input_dtypes: dict[nn.Module, torch.dtype] = {}

    def to_parameter_dtype(norm: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        reference = norm.running_mean if norm.running_mean is not None else norm.weight
        x = args[0]
        if reference is None or x.dtype == reference.dtype:
            return None
        input_dtypes[norm] = x.dtype
        return (x.to(reference.dtype), *args[1:])

    def back_to_input_dtype(norm: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        dtype = input_dtypes.pop(norm, None)
        return None if dtype is None else output.to(dtype)

    handles = [
        h
        for m in norms
        for h in (m.register_forward_pre_hook(to_parameter_dtype), m.register_forward_hook(back_to_input_dtype))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_with_cloned_buffers(
    module: nn.Module, params: dict[str, torch.Tensor], inputs: torch.Tensor
) -> torch.Tensor:
    """``module(inputs)`` with ``params``, on copies of its buffers (BatchNorm stats stay as they are)."""
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    return functional_call(module, {**params, **buffers}, (inputs,))
