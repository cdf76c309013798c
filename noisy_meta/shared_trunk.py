"""Run a model from the input of one of its modules: fast forwards that skip the shared trunk.

When only the parameters from some module onwards get fast weights (``fast_params="head"``
or ``"last_stage"``), everything before that module, the trunk, computes the same thing for
the student and for every fast-weight student. The meta step then needs the trunk's output
``h`` once, from the student's own forward: each synthetic set runs the suffix on ``h``, its
meta-gradient is taken with respect to the suffix's parameters and to ``h``, and the summed
gradient at ``h`` goes back through the trunk once, together with the cross-entropy.

``h`` is the input of the module where the fast weights start, captured by a forward
pre-hook (`capture_input`). When that module is the classifier, the suffix is the classifier
alone. For any other module, `resumed_at` runs the model with hooks: the trunk runs on two
samples without autograd (its result is thrown away) and the module gets ``h`` instead of its
real input. Either way the split is checked once against the plain forward
(`suffix_matches_model`); a model where they differ is trained through the general path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .features import eval_mode

#: Samples the skipped trunk still runs on (BatchNorm in training mode needs more than one).
TRUNK_SAMPLES = 2


@dataclass
class CapturedInput:
    """The first positional input of a module, as seen by a forward pre-hook."""

    value: torch.Tensor | None = None
    calls: int = 0


@contextlib.contextmanager
def capture_input(module: nn.Module) -> Iterator[CapturedInput]:
    """Record what ``module`` is called with while the context is open."""
    captured = CapturedInput()

    def record(_module: nn.Module, args: tuple) -> None:
        captured.value, captured.calls = args[0], captured.calls + 1

    handle = module.register_forward_pre_hook(record)
    try:
        yield captured
    finally:
        handle.remove()


@dataclass
class _Resumed:
    calls: int = 0
    grad_enabled: list[bool] = field(default_factory=list)


@contextlib.contextmanager
def resumed_at(model: nn.Module, start: nn.Module, trunk_output: torch.Tensor) -> Iterator[_Resumed]:
    """Inside, ``model(x)`` runs its trunk on ``x[:2]`` without autograd and feeds ``start`` ``trunk_output``.

    Pass the first `TRUNK_SAMPLES` inputs; the output has ``trunk_output``'s batch size. The
    grad mode in force when ``model`` is called is restored for ``start`` and what follows.
    """
    state = _Resumed()

    def skip_trunk(_module: nn.Module, _args: tuple) -> None:
        state.grad_enabled.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def resume(_module: nn.Module, args: tuple) -> tuple:
        state.calls += 1
        torch.set_grad_enabled(state.grad_enabled[-1])
        return (trunk_output, *args[1:])

    def restore(_module: nn.Module, _args: tuple, _output: torch.Tensor) -> None:
        torch.set_grad_enabled(state.grad_enabled.pop())

    handles = [
        model.register_forward_pre_hook(skip_trunk),
        start.register_forward_pre_hook(resume),
        model.register_forward_hook(restore),
    ]
    grad_enabled = torch.is_grad_enabled()
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()
        torch.set_grad_enabled(grad_enabled)  # also when the forward raised between the hooks


@torch.no_grad()
def suffix_matches_model(model: nn.Module, start: nn.Module, inputs: torch.Tensor, start_is_last: bool) -> bool:
    """Whether running ``model`` from ``start`` on its captured input reproduces ``model(inputs)``.

    ``start_is_last``: ``start``'s output is the model's output (the classifier), so the suffix
    is ``start`` alone; otherwise it runs through `resumed_at`. Eval mode, so BatchNorm and
    dropout depend neither on the batch nor on chance. False when ``start`` is not called
    exactly once, when the outputs differ, or when the resumed forward fails (e.g. a model
    that reuses, after ``start``, the batch size it saw at its input).
    """
    with eval_mode(model):
        with capture_input(start) as captured:
            whole = model(inputs)
        if captured.calls != 1 or not isinstance(captured.value, torch.Tensor):
            return False
        try:
            if start_is_last:
                suffix_output = start(captured.value)
            else:
                with resumed_at(model, start, captured.value) as resumed:
                    suffix_output = model(inputs[:TRUNK_SAMPLES])
                if resumed.calls != 1:
                    return False
        except (RuntimeError, ValueError, AssertionError):  # shape errors, a model's own batch checks
            return False
    return suffix_output.shape == whole.shape and torch.allclose(suffix_output, whole, rtol=1e-4, atol=1e-5)
