"""Making arbitrary models fit the meta step: unwrapping, and twice-differentiable ops.

The second-order meta-gradient differentiates the student's forward twice. Most PyTorch ops
support that; two that timm models use do not:

* fused scaled-dot-product attention (flash / memory-efficient kernels). timm attention
  modules pick the fused path with a ``fused_attn`` flag; `make_twice_differentiable` turns it
  off, and `second_order_context` restricts any other ``F.scaled_dot_product_attention`` call
  to the math backend;
* ``hardsigmoid`` (the SE gate of MobileNetV3 and others), and ``hardswish`` on older PyTorch:
  their modules are replaced by exact composite equivalents (``relu6(x + 3) / 6``).

Anything else without a double backward surfaces as `SecondOrderUnsupportedError`, which
names the op and suggests ``first_order=True``.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class SecondOrderUnsupportedError(RuntimeError):
    """The model uses an op that PyTorch cannot differentiate twice."""


class TwiceDifferentiableHardsigmoid(nn.Hardsigmoid):
    """``nn.Hardsigmoid`` computed as ``relu6(x + 3) / 6``, which has a double backward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.relu6(input + 3.0) / 6.0


class TwiceDifferentiableHardswish(nn.Hardswish):
    """``nn.Hardswish`` computed as ``x * relu6(x + 3) / 6``, which has a double backward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input * F.relu6(input + 3.0) / 6.0


def _has_double_backward(fn) -> bool:
    # fixed points on both sides of the activations' kinks; nothing drawn from the global RNG, which would shift
    # a framework's augmentation after the wrapper is built (a resumed run would not equal the uninterrupted one)
    x = torch.tensor([-4.0, -1.5, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
    try:
        torch.autograd.grad(grad.sum(), x, allow_unused=True)
    except RuntimeError:
        return False
    return True


@functools.cache
def _replacements() -> dict[type[nn.Module], type[nn.Module]]:
    """Activation modules without a double backward in this PyTorch, and their stand-ins.

    Probed on first use (not at import), once per process.
    """
    candidates = {
        nn.Hardsigmoid: (F.hardsigmoid, TwiceDifferentiableHardsigmoid),
        nn.Hardswish: (F.hardswish, TwiceDifferentiableHardswish),
    }
    return {cls: new for cls, (fn, new) in candidates.items() if not _has_double_backward(fn)}


def make_twice_differentiable(model: nn.Module) -> list[str]:
    """Switch ``model``, in place, to ops that support a double backward.

    Numerically the model computes the same function (up to float rounding). Returns one
    line per change, e.g. ``"blocks.0.attn: fused_attn -> False"``.
    """
    changes = []
    for name, module in list(model.named_modules()):
        if getattr(module, "fused_attn", None) is True:
            module.fused_attn = False
            changes.append(f"{name or '<root>'}: fused_attn -> False")
        replacement = _replacements().get(type(module))
        if replacement is not None and name:
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child_name, replacement(inplace=getattr(module, "inplace", False)))
            changes.append(f"{name}: {type(module).__name__} -> {replacement.__name__}")
    return changes


def second_order_context(enabled: bool) -> contextlib.AbstractContextManager:
    """Math-only scaled-dot-product attention while ``enabled`` (it has a double backward)."""
    return sdpa_kernel([SDPBackend.MATH]) if enabled else contextlib.nullcontext()


_NO_DOUBLE_BACKWARD = (
    re.compile(r"derivative for (\S+) is not implemented"),
    re.compile(r"(\S+) does not support double backward", re.IGNORECASE),
    re.compile(r"(torch\.compile).*double backward", re.IGNORECASE),
)


@contextlib.contextmanager
def explain_double_backward_errors() -> Iterator[None]:
    """Re-raise PyTorch's "no double backward" errors as `SecondOrderUnsupportedError`."""
    try:
        yield
    except RuntimeError as error:
        for pattern in _NO_DOUBLE_BACKWARD:
            match = pattern.search(str(error))
            if match:
                raise SecondOrderUnsupportedError(
                    f"the second-order meta-gradient needs a double backward, and {match.group(1)} "
                    "has none. Use MetaNoiseConfig(first_order=True), or replace that op with a "
                    "twice-differentiable equivalent during training."
                ) from error
        raise


def unwrap_model(model: nn.Module) -> nn.Module:
    """The eager module behind ``torch.compile`` and data-parallel wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model
