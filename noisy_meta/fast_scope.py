"""Where the fast weights start: the whole model, or a suffix after a shared trunk.

A scope runs the student's conventional forward and says what the fast-weight passes of the
meta step run on (`FastPass`): which module, on which input, with which parameters stepped.

* `WholeModel`: every synthetic set runs the whole model (``fast_params="all"``, glob
  patterns, predicates, the sequential update rule, and the own-loop API).
* `SharedTrunk`: ``fast_params="head"`` / ``"last_stage"`` on a timm model with the joint
  update rule. Everything before the first fast weight computes the same thing for every
  fast-weight student, so the trunk's output is taken from the student's own forward and
  each set runs only the suffix on it (see `noisy_meta.shared_trunk`). The split is checked
  once, on the first batch that needs it, against the plain forward; a model where the two
  differ (its input reaches the output around the suffix) is run as `WholeModel`, with the
  same parameters stepped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .config import MetaNoiseConfig
from .fast_weights import forward_with_cloned_buffers, last_stage_name, select_fast_params
from .features import is_timm_classifier
from .shared_trunk import TRUNK_SAMPLES, capture_input, resumed_at, suffix_matches_model


@dataclass
class FastPass:
    """What each synthetic set's fast-weight forward runs: ``module(inputs)`` with ``names`` stepped.

    ``logits`` is the output whose graph the inner gradients use; ``None`` means ``module``
    runs once more (buffers untouched) when the pass is opened. ``trunk_leaf``: the detached
    trunk output the suffix starts from, where the meta-gradient is collected; with
    ``resume_at``, ``module`` is resumed at that submodule with it (`resumed_at`).
    """

    module: nn.Module
    inputs: torch.Tensor
    names: list[str]
    logits: torch.Tensor | None = None
    trunk_leaf: torch.Tensor | None = None
    resume_at: nn.Module | None = None

    @contextlib.contextmanager
    def open(self) -> Iterator[torch.Tensor]:
        """Inside, fast forwards of ``module`` run the suffix only; yields the inner-step logits."""
        resume = contextlib.nullcontext()
        if self.resume_at is not None:
            resume = resumed_at(self.module, self.resume_at, self.trunk_leaf)
        with resume:
            if self.logits is None:
                self.logits = forward_with_cloned_buffers(
                    self.module, dict(self.module.named_parameters()), self.inputs
                )
            yield self.logits

    def subset(self, index: torch.Tensor) -> FastPass:
        """The same pass on the samples ``index`` only (its logits computed afresh when opened)."""
        if self.trunk_leaf is None:
            return FastPass(self.module, self.inputs[index], self.names)
        leaf = self.trunk_leaf.detach()[index].requires_grad_()
        inputs = leaf if self.inputs is self.trunk_leaf else self.inputs
        return FastPass(self.module, inputs, self.names, trunk_leaf=leaf, resume_at=self.resume_at)


@dataclass
class StudentForward:
    """The student's logits, what its fast passes run, and its trunk output (shared trunk only)."""

    logits: torch.Tensor
    fast: FastPass
    trunk: torch.Tensor | None = None

    def through(self, trunk_grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The ``(trunk output, meta-gradient at it)`` pair to send back with the cross-entropy."""
        return None if self.trunk is None else (self.trunk, trunk_grad)

    def subset(self, index: torch.Tensor) -> StudentForward:
        """The meta step's view of the samples ``index`` (``meta_batch_fraction < 1``)."""
        trunk = None if self.trunk is None else self.trunk[index]
        return StudentForward(self.logits[index], self.fast.subset(index), trunk)


class WholeModel:
    """Fast weights anywhere in the model: each synthetic set runs the whole model."""

    def __init__(self, module: nn.Module, fast_names: list[str]) -> None:
        self.module = module
        self.fast_names = fast_names

    def forward(self, inputs: torch.Tensor, meta: bool = True, keep_buffers: bool = False) -> StudentForward:
        """The student's forward. ``keep_buffers``: on copies of the buffers (BatchNorm stats untouched)."""
        if keep_buffers:
            logits = forward_with_cloned_buffers(self.module, dict(self.module.named_parameters()), inputs)
        else:
            logits = self.module(inputs)
        return self.around(inputs, logits)

    def around(self, inputs: torch.Tensor, logits: torch.Tensor) -> StudentForward:
        """A forward the caller ran (``logits = model(inputs)``, graph alive)."""
        return StudentForward(logits, FastPass(self.module, inputs, self.fast_names, logits))


class SharedTrunk(WholeModel):
    """Fast weights from ``start`` on: the trunk before it runs once per iteration.

    ``start_is_last``: ``start`` is the classifier (its output is the model's), so the suffix
    is ``start`` alone; otherwise the model is resumed at ``start`` with hooks.
    """

    def __init__(self, module: nn.Module, fast_names: list[str], start: nn.Module, start_is_last: bool) -> None:
        super().__init__(module, fast_names)
        self.start = start
        self.start_is_last = start_is_last
        #: Whether the split reproduces the model; None until the first batch that needs it.
        self.shared: bool | None = None
        #: The whole model cannot run in the fast passes (an FSDP2-sharded trunk): a split that fails is an error.
        self.required = False

    def forward(self, inputs: torch.Tensor, meta: bool = True, keep_buffers: bool = False) -> StudentForward:
        if not meta or keep_buffers or not self._verified(inputs):
            return super().forward(inputs, meta, keep_buffers)
        with capture_input(self.start) as captured:
            logits = self.module(inputs)
        leaf = captured.value.detach().requires_grad_()
        if self.start_is_last:
            names = [name for name, p in self.start.named_parameters() if p.requires_grad]
            fast = FastPass(self.start, leaf, names, trunk_leaf=leaf)
        else:
            fast = FastPass(self.module, inputs[:TRUNK_SAMPLES], self.fast_names, trunk_leaf=leaf, resume_at=self.start)
        return StudentForward(logits, fast, trunk=captured.value)

    def _verified(self, inputs: torch.Tensor) -> bool:
        if self.shared is None:
            self.shared = suffix_matches_model(self.module, self.start, inputs, self.start_is_last)
            if not self.shared and self.required:
                raise ValueError(
                    "the model's output does not come from its head's (or last stage's) input alone, so the trunk "
                    "cannot run once: the meta step cannot train this sharded model"
                )
        return self.shared


def make_scope(module: nn.Module, config: MetaNoiseConfig, fast_names: list[str]) -> WholeModel:
    """`SharedTrunk` where the fast weights start at a timm model's head or last stage (joint rule).

    With ``fast_params="all"`` on a model whose trainable parameters are exactly its head (a
    frozen backbone) or its last stage and head, the fast weights are that suffix anyway: the
    shared trunk is used for it, so each synthetic set does not run the frozen layers again.
    """
    spec = config.fast_params
    if spec == "all":
        spec = trainable_suffix(module, fast_names) or spec
    if config.update_rule != "joint" or not is_timm_classifier(module) or spec not in ("head", "last_stage"):
        return WholeModel(module, fast_names)
    start = module.get_classifier() if spec == "head" else module.get_submodule(last_stage_name(module))
    if not isinstance(start, nn.Module):
        return WholeModel(module, fast_names)
    return SharedTrunk(module, fast_names, start, start_is_last=spec == "head")


def trainable_suffix(module: nn.Module, trainable: list[str]) -> str | None:
    """``"head"`` or ``"last_stage"`` when ``trainable`` (parameter names) is exactly that suffix of
    a timm model, else None."""
    if not is_timm_classifier(module) or not isinstance(module.get_classifier(), nn.Module):
        return None  # e.g. LeViT's classifier is a (head, distillation head) pair
    for mode in ("head", "last_stage"):
        try:
            if set(select_fast_params(module, mode)) == set(trainable):
                return mode
        except ValueError:  # the model has no such suffix with a trainable parameter
            continue
    return None
