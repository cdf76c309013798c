"""Collecting an update's gradient and applying it: the part of an iteration after the losses.

Kept apart from computing the losses, as timm's ``train_one_epoch`` keeps its loss apart
from the scaler and the optimizer step. `GradientUpdate` owns the trainable parameters'
``.grad`` for the duration of one update:

* `GradientUpdate.add` adds a loss's gradient, scaled as ``accelerator.backward`` would (fp16
  loss scale, accumulation divisor), with ``autograd.grad`` rather than ``backward`` so DDP's
  reducer hooks never fire (the meta step runs on the unwrapped module);
* `GradientUpdate.apply` all-reduces once, clips, checks that everything is finite and steps
  the optimizer, or skips the update; it always leaves the gradient zeroed;
* it keeps the gradient between the batches of an ``accelerator.accumulate`` window (the
  window's state is `noisy_meta.update_state.UpdateState`'s) and `GradientUpdate.rollback` (an
  update that raises or is skipped leaves BatchNorm buffers and gradients as they were).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .runtime import TrainingRuntime, is_dtensor
from .update_state import UpdateState


@dataclass
class Rollback:
    """Saved buffers of one iteration; `restore` puts them back (a skipped update)."""

    buffers: list[torch.Tensor]
    saved: list[torch.Tensor]

    @torch.no_grad()
    def restore(self) -> None:
        for buffer, value in zip(self.buffers, self.saved):
            buffer.copy_(value)


class GradientUpdate:
    """The gradient of the trainable parameters, from the first loss to the optimizer step.

    Args:
        params: the trainable parameters (of the unwrapped module).
        runtime: scaling, all-reduce and stepping (plain PyTorch, Accelerate, DDP, AMP).
        clip_grad: clip the global norm to this value before each step; ``None``: no clipping.
        state: the loop's `UpdateState` (whether this micro-batch ends an update, the window).
    """

    def __init__(
        self, params: list[nn.Parameter], runtime: TrainingRuntime, clip_grad: float | None, state: UpdateState
    ) -> None:
        self.params = params
        self.runtime = runtime
        self.clip_grad = clip_grad
        self.state = state

    def begin(self) -> None:
        """Start an iteration: a fresh gradient unless an accumulation window is open."""
        if not self.state.accumulating:
            self.zero()

    def hold(self) -> None:
        """Keep the gradient for the next micro-batch of the accumulation window."""
        self.state.hold()

    def add(
        self,
        loss: torch.Tensor,
        retain_graph: bool = False,
        wrt: torch.Tensor | None = None,
        through: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> torch.Tensor | None:
        """Add the gradient of ``loss`` (scaled as ``accelerator.backward`` would) to ``.grad``.

        ``wrt``: also return the gradient with respect to that tensor. ``through``: a
        ``(tensor, gradient)`` pair backpropagated together with ``loss`` (a gradient already
        scaled, e.g. one returned for ``wrt``); skipped when the gradient is ``None`` or the
        tensor needs none (a frozen trunk).
        """
        outputs, grad_outputs = [self.runtime.scale_loss(loss)], [None]
        if through is not None and through[1] is not None and through[0].requires_grad:
            outputs.append(through[0])
            grad_outputs.append(through[1])
        if self.runtime.sharded and wrt is None:  # through the sharded trunk: FSDP2's backward reduces its gradient
            torch.autograd.backward(outputs, grad_outputs, retain_graph=retain_graph)
            return None
        inputs = self.params if wrt is None else [*self.params, wrt]
        grads = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph, allow_unused=True)
        with torch.no_grad():
            for param, grad in zip(self.params, grads):
                if grad is None:
                    continue
                if param.grad is None:
                    param.grad = grad
                else:
                    param.grad.add_(grad)
        return grads[-1] if wrt is not None else None

    def apply(self, *losses: torch.Tensor) -> bool:
        """All-reduce, clip and step unless a loss or gradient is not finite; zero the gradient.

        Returns whether the parameters were updated. Every rank makes the same decision.
        """
        runtime = self.runtime
        losses_finite = bool(torch.stack([torch.isfinite(loss).all() for loss in losses]).all())
        ok = runtime.all_reduce_gradients(self.params, losses_finite)
        if ok and self.clip_grad is not None:
            runtime.clip_gradients(self.params, self.clip_grad)
        if ok and runtime.scaler is None:  # a GradScaler checks the gradients itself
            checks = [_whole(p.grad.isfinite().all()) for p in self.params if p.grad is not None]
            ok = not checks or bool(torch.stack(checks).all())
        if not ok:  # fp16: an overflow in the inner step shows as a non-finite meta loss
            runtime.back_off()
        applied = ok and runtime.optimizer_step()
        self.zero()
        self.state.close_window()
        return applied

    def zero(self) -> None:
        for param in self.params:
            param.grad = None

    @contextlib.contextmanager
    def rollback(self, module: nn.Module) -> Iterator[Rollback]:
        """Save ``module``'s buffers; on an exception put them back and drop the gradient.

        The yielded `Rollback` restores the buffers on request (a skipped update).
        """
        buffers = list(module.buffers())
        saved = Rollback(buffers, [b.clone() for b in buffers])
        try:
            yield saved
        except BaseException:
            saved.restore()
            self.zero()
            self.state.close_window()
            raise


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) result gathered whole, a plain one as it is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor
