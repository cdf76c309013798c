"""Fast weights: one SGD step per synthetic label set, and the meta loss that follows it.

For set m the fast weights are ``theta'_m = theta - alpha * grad_theta CE(f(x; theta), y_m)``
(only for the selected parameters), and the meta loss is the KL divergence from the mentor's
predictions to the student's predictions at ``theta'_m``. The fast forward goes through
`torch.func.functional_call` on the real module with *cloned* buffers, so BatchNorm running
statistics and ``num_batches_tracked`` of the student are never touched by it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .config import FastParamsSpec


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


def _from_last_stage(module: nn.Module, names: list[str]) -> list[str]:
    """Parameters from the start of the last feature stage (timm's ``feature_info``) to the head."""
    feature_info = getattr(module, "feature_info", None)
    stages = [info.get("module") for info in feature_info or [] if isinstance(info, dict)]
    if not stages or not stages[-1]:
        raise ValueError(
            "fast_params='last_stage' needs a timm model that declares its stages (feature_info); "
            "pass glob patterns or a predicate (name, param) -> bool instead"
        )
    prefix = stages[-1] + "."
    start = next((i for i, name in enumerate(names) if name.startswith(prefix)), None)
    if start is None:
        raise ValueError(f"fast_params='last_stage': no trainable parameter under the last stage {stages[-1]!r}")
    return names[start:]  # timm registers modules in forward order: the stage, final norms, head


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 when it is half precision (losses are computed in float32)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def kl_to_mentor(student_logits: torch.Tensor, mentor_log_probs: torch.Tensor) -> torch.Tensor:
    """``KL(mentor || student)`` per sample, averaged over the batch."""
    log_probs = F.log_softmax(upcast(student_logits), dim=1)
    return F.kl_div(log_probs, mentor_log_probs, log_target=True, reduction="batchmean")


def meta_losses(
    module: nn.Module,
    inputs: torch.Tensor,
    logits: torch.Tensor,
    synthetic_labels: torch.Tensor,
    mentor_log_probs: torch.Tensor,
    fast_names: list[str],
    inner_lr: float,
    first_order: bool,
    grad_scale: float = 1.0,
) -> Iterator[torch.Tensor]:
    """Yield the meta loss ``J_m`` of each synthetic label set in turn.

    With no synthetic set (``[0, B]`` labels) it yields one loss, ``KL(mentor || student)``
    on ``logits`` itself: the consistency-only ablation.

    ``logits`` is the student's output for ``inputs`` (its graph is reused for every inner
    gradient and must stay alive while the generator runs). Consume one loss before asking
    for the next to keep one set's graph in memory at a time.

    ``grad_scale`` (fp16's loss scale, a power of two) multiplies each inner loss before its
    gradient and divides the gradient after, so half-precision backward passes do not
    underflow; an overflow shows up as a non-finite meta loss.
    """
    if synthetic_labels.shape[0] == 0:  # no synthetic set: consistency at the student's own weights
        yield kl_to_mentor(logits, mentor_log_probs)
        return
    params = dict(module.named_parameters())
    fast_tensors = [params[name] for name in fast_names]
    for labels in synthetic_labels:
        fast = _fast_weights(logits, labels, fast_names, fast_tensors, inner_lr, first_order, grad_scale)
        yield kl_to_mentor(forward_with_cloned_buffers(module, {**params, **fast}, inputs), mentor_log_probs)


def head_meta_losses(
    classifier: nn.Module,
    features: torch.Tensor,
    logits: torch.Tensor,
    synthetic_labels: torch.Tensor,
    mentor_log_probs: torch.Tensor,
    inner_lr: float,
    first_order: bool,
    grad_scale: float = 1.0,
) -> Iterator[torch.Tensor]:
    """`meta_losses` when only the classifier gets fast weights, sharing one body pass.

    ``logits = classifier(features)``, with ``features`` the body's pre-logits output. Each
    set's inner gradient and fast forward involve the classifier only; the body's forward
    (and, once the losses are summed, its backward) happens once for all M sets.
    """
    if synthetic_labels.shape[0] == 0:
        yield kl_to_mentor(logits, mentor_log_probs)
        return
    names = [name for name, p in classifier.named_parameters() if p.requires_grad]
    params = [p for p in classifier.parameters() if p.requires_grad]
    for labels in synthetic_labels:
        fast = _fast_weights(logits, labels, names, params, inner_lr, first_order, grad_scale)
        yield kl_to_mentor(functional_call(classifier, fast, (features,)), mentor_log_probs)


def _fast_weights(
    logits: torch.Tensor,
    labels: torch.Tensor,
    names: list[str],
    params: list[torch.Tensor],
    inner_lr: float,
    first_order: bool,
    grad_scale: float,
) -> dict[str, torch.Tensor]:
    """``{name: p - inner_lr * grad_p CE(logits, labels)}``; a parameter outside the graph keeps ``p``.

    The inner loss is multiplied by ``grad_scale`` before its gradient and the gradient divided
    by it after (exact for fp16's power-of-two scales).
    """
    inner_loss = F.cross_entropy(logits, labels)
    if grad_scale != 1.0:
        inner_loss = inner_loss * grad_scale
    grads = torch.autograd.grad(inner_loss, params, create_graph=not first_order, retain_graph=True, allow_unused=True)
    fast = {}
    for name, p, g in zip(names, params, grads):
        if g is None:
            fast[name] = p
            continue
        if grad_scale != 1.0:
            g = g / grad_scale
        fast[name] = p - inner_lr * (g.detach() if first_order else g)
    return fast


def forward_with_cloned_buffers(module: nn.Module, params: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """``module(inputs)`` with ``params``, on copies of its buffers (BatchNorm stats stay as they are)."""
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    return functional_call(module, {**params, **buffers}, (inputs,))
