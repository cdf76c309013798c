"""`MetaNoiseWrapper`: MLNT's meta step around any timm model and any optimizer."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn

from .compat import (
    explain_double_backward_errors,
    make_twice_differentiable,
    second_order_context,
    unwrap_model,
)
from .config import MetaNoiseConfig
from .fast_weights import (
    forward_with_cloned_buffers,
    last_stage_name,
    meta_losses,
    select_fast_params,
    upcast,
)
from .features import (
    eval_mode,
    features_of,
    is_timm_classifier,
    logits_and_features,
)
from .runtime import TrainingRuntime
from .shared_trunk import TRUNK_SAMPLES, capture_input, resumed_at, suffix_matches_model
from .synthetic import SyntheticLabels, nearest_neighbors, neighbor_label_transfer


class MetaNoiseWrapper:
    """Learning to learn from noisy labels (MLNT) around a model and its optimizer.

    Each `step` runs one whole training iteration:

    1. the conventional forward of the student (it updates BatchNorm statistics once, exactly
       as plain training does) and its cross-entropy ``CE``;
    2. the meta step, once the meta weight ``w`` is above zero: the mentor's predictions and
       neighbour-search features, M synthetic label sets by neighbour label transfer, and for
       each set one fast-weight SGD step and the KL divergence ``J_m`` from the mentor to the
       fast-weight student. The gradient of ``w * mean_m J_m`` is accumulated one set at a
       time (``sets_per_pass`` sets, batched, if asked), so memory does not grow with M;
    3. the update (by default one optimizer step on ``grad CE + w * grad J``), skipped when the
       loss or any gradient is not finite;
    4. the mentor's EMA update.

    Use it in your own loop instead with `meta_backward` (or `meta_loss`) after your forward
    and `update_mentor` after your optimizer step.

    With Hugging Face Accelerate, pass the prepared model and optimizer and the accelerator:
    `step` then runs under its autocast, applies fp16's GradScaler (to the inner gradients
    too), honours ``accelerator.accumulate`` and, with several processes, all-reduces the
    whole gradient once per update (see `noisy_meta.runtime`).

    Trade-offs worth knowing:

    * The second-order meta-gradient (the paper's maths) costs roughly one extra double
      backward per synthetic set; ``first_order=True`` is markedly cheaper and also works with
      ops that cannot be differentiated twice.
    * Cheaper meta steps: ``fast_params="head"`` or ``"last_stage"`` run the trunk before the
      fast weights once per iteration (each set runs only the rest); ``meta_every=N`` runs the
      meta step on every N-th update. They keep less of MLNT's accuracy gain (see the README).
    * ``sets_per_pass > 1`` batches that many sets into one vector-Jacobian product and one
      ``vmap``'d forward: fewer, larger kernels (for GPUs) for that many graphs in memory.
    * For second order the student is switched, in place, to twice-differentiable ops where
      needed (timm attention off its fused kernel, ``nn.Hardsigmoid`` to a composite form);
      `compat_changes` lists what changed. The mentor keeps the original ops.
    * The mentor averages parameters *and* buffers (timm's ``ModelEmaV3`` default): averaging
      parameters only, as the reference code does, leaves the mentor's BatchNorm statistics at
      their initial values and its eval-mode predictions near chance.
    * The meta step runs on the eager, unwrapped module: ``torch.compile`` cannot
      differentiate twice, so a compiled model is trained through its ``_orig_mod``; DDP's
      reducer cannot serve ``autograd.grad`` either, so `step` all-reduces the gradient itself
      in one flat buffer after the backward instead of overlapping it with the backward.

    Args:
        model: the student, a timm model or any module mapping ``[B, ...]`` inputs to
            ``[B, C]`` logits. It may be ``torch.compile``-d.
        optimizer: any optimizer over the student's parameters.
        config: a `MetaNoiseConfig`; ``None`` uses the defaults.
        mentor: optional starting mentor with the student's architecture (e.g. the best
            mentor of a previous run, for iterative training); by default a copy of the
            student. The wrapper keeps its own copy and never changes the module you pass.
        accelerator: the ``accelerate.Accelerator`` that prepared ``model`` and ``optimizer``.
        scaler: a ``torch.amp.GradScaler`` for fp16 training without Accelerate.
        **overrides: `MetaNoiseConfig` fields that replace those of ``config``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: MetaNoiseConfig | None = None,
        *,
        mentor: nn.Module | None = None,
        accelerator: Any | None = None,
        scaler: torch.amp.GradScaler | None = None,
        **overrides: Any,
    ) -> None:
        if config is None:
            config = MetaNoiseConfig()
        if not isinstance(config, MetaNoiseConfig):
            raise TypeError(f"config must be a MetaNoiseConfig, got {type(config).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.config = config.with_overrides(**overrides) if overrides else config
        self.runtime = TrainingRuntime(model, optimizer, accelerator, scaler)
        if self.config.update_rule == "sequential" and self.runtime.accumulation_steps > 1:
            raise ValueError(
                "update_rule='sequential' makes two optimizer updates per batch and cannot accumulate "
                "gradients over batches; use update_rule='joint' with gradient accumulation"
            )
        self.model = model
        self.module = unwrap_model(model)
        self.optimizer = optimizer
        self._params = [p for p in self.module.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("the model has no trainable parameters")
        self._fast_names = select_fast_params(self.module, self.config.fast_params)
        self._trunk_start = self._shared_trunk_start()
        self._trunk_shared: bool | None = None if self._trunk_start is not None else False  # None: check on first use
        self._num_classes = getattr(self.module, "num_classes", None)

        self._ema, self._mentor = self._build_mentor(mentor)
        # After the mentor copy, so the mentor keeps the faster (fused) ops for its no-grad passes.
        self.compat_changes: list[str] = (
            [] if self.config.first_order else make_twice_differentiable(self.module)
        )
        self._seed = self._shared_seed(self.config.seed)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._accumulating = False
        self.num_updates = 0
        self.num_skipped = 0

    # ------------------------------------------------------------------ public API

    @property
    def mentor(self) -> nn.Module:
        """The mentor (teacher) network, in eval mode."""
        return self._mentor

    @property
    def meta_weight(self) -> float:
        """The meta-loss weight ``w`` of the next update."""
        return self.config.meta_weight_at(self.num_updates)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """One whole MLNT iteration on a batch; returns its statistics.

        Keys: ``loss`` (``ce_loss + meta_weight * meta_loss``), ``ce_loss``, ``meta_loss``
        (mean KL over the synthetic sets), ``meta_weight``, ``labels_changed`` (mean fraction
        of labels the synthetic sets changed), ``mentor_decay``, ``skipped`` (1.0 when a
        non-finite loss or gradient skipped the update), ``num_skipped`` and ``step`` (updates
        so far). On any error the model's parameters, buffers and optimizer state are left as
        they were.

        Inside ``accelerator.accumulate(model)`` a batch that only accumulates gradients
        returns its losses with no update made (``step`` unchanged).
        """
        targets = self._check_batch(inputs, targets)
        if not self._accumulating:
            self._zero_grad()
        with self._restore_on_failure(), self.runtime.autocast():
            if self.config.update_rule == "joint":
                return self._joint_step(inputs, targets)
            return self._sequential_step(inputs, targets)

    def meta_backward(
        self, inputs: torch.Tensor, targets: torch.Tensor, outputs: torch.Tensor
    ) -> dict[str, float]:
        """Accumulate ``w * grad J`` into the parameters' ``.grad`` for a batch you already ran.

        ``outputs`` are the student's logits for ``inputs`` from your own forward; their graph
        stays alive, so call your own ``loss.backward()`` (or ``accelerator.backward(loss)``)
        after this. One synthetic set's graph is held at a time. Returns ``meta_loss``,
        ``meta_weight`` and ``labels_changed``. For second order run that forward inside
        ``with wrapper.forward_context():``.

        The gradient is added to ``.grad`` directly (with the accelerator's accumulation
        divisor and fp16 loss scale), without firing DDP's hooks: your own backward through
        the DDP model then all-reduces meta and CE gradient together, once.
        """
        targets = self._check_batch(inputs, targets)
        self._check_outputs(outputs, targets)
        weight = self.meta_weight
        with self.runtime.autocast():
            meta_loss, changed = self._accumulate_meta_gradient(inputs, targets, outputs, weight)
        values = torch.stack([meta_loss, changed]).tolist()
        return {"meta_loss": values[0], "meta_weight": weight, "labels_changed": values[1]}

    def meta_loss(self, inputs: torch.Tensor, targets: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """The weighted meta loss ``w * mean_m J_m`` as one differentiable scalar.

        For loops that want a single ``(loss + meta).backward()`` (or ``accelerator.backward``,
        which also works through DDP). Unlike `meta_backward` it keeps all M graphs alive
        until that backward, so memory grows with M.
        """
        targets = self._check_batch(inputs, targets)
        self._check_outputs(outputs, targets)
        weight = self.meta_weight
        if weight == 0.0:
            return outputs.new_zeros(()).float()
        with self.runtime.autocast():
            synthetic, mentor_log_probs = self._synthetic_targets(inputs, targets)
            with explain_double_backward_errors():
                losses = torch.cat(list(self._meta_losses(inputs, outputs, synthetic.labels, mentor_log_probs)))
        return losses.mean() * weight

    @torch.no_grad()
    def update_mentor(self) -> None:
        """EMA-update the mentor from the student and advance the update counter.

        Call it once after each optimizer step of your own loop (`step` calls it for you). The
        counter drives the meta-weight ramp and the mentor decay schedule. With several
        processes it first makes BatchNorm statistics equal on all ranks (``dist_bn``). It does
        nothing on an ``accelerator.accumulate`` batch that made no update, or after an
        Accelerate optimizer step that fp16's GradScaler skipped.
        """
        if not self.runtime.sync_gradients or getattr(self.optimizer, "step_was_skipped", False):
            return
        self.runtime.sync_buffers(self.module, self.config.dist_bn)
        if self._ema is not None:
            self._ema.apply_update_(self.module, self.config.mentor_decay_at(self.num_updates))
        self.num_updates += 1

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Context for your own student forward: math attention when second order needs it."""
        return second_order_context(not self.config.first_order)

    def state_dict(self) -> dict[str, Any]:
        """Counters, synthetic-label RNG state and mentor weights, for checkpointing."""
        return {
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
            "seed": self._seed,
            "generators": {str(device): g.get_state() for device, g in self._generators.items()},
            "mentor": self._mentor.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved."""
        self._mentor.load_state_dict(state["mentor"])
        self.num_updates = int(state["num_updates"])
        self.num_skipped = int(state["num_skipped"])
        self._seed = int(state["seed"])
        self._generators = {}
        for device, generator_state in state["generators"].items():
            self._generator(torch.device(device)).set_state(generator_state)

    # ------------------------------------------------------------------ the iteration

    def _joint_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        step_index, weight = self.num_updates, self.meta_weight
        if weight > 0.0 and self._trunk_shared is not False and self._trunk_is_shared(inputs):
            return self._joint_step_shared_trunk(inputs, targets, step_index, weight)
        with self.forward_context():
            logits = self.module(inputs)
            self._check_outputs(logits, targets)
            ce_loss = F.cross_entropy(upcast(logits), targets)
            meta_loss, changed = self._accumulate_meta_gradient(inputs, targets, logits, weight)
            self._add_grad(ce_loss)
        return self._finish_joint_step(step_index, ce_loss, meta_loss, changed, weight)

    def _finish_joint_step(
        self, step_index: int, ce_loss: torch.Tensor, meta_loss: torch.Tensor, changed: torch.Tensor, weight: float
    ) -> dict[str, float]:
        """Update (unless only accumulating), then the statistics of the iteration."""
        if not self.runtime.sync_gradients:
            self._accumulating = True
            return self._stats(step_index, ce_loss, meta_loss, changed, weight, skipped=False)
        applied = self._apply_update(ce_loss, meta_loss)
        self._finish_iteration(applied, applied)
        return self._stats(step_index, ce_loss, meta_loss, changed, weight, skipped=not applied)

    def _joint_step_shared_trunk(
        self, inputs: torch.Tensor, targets: torch.Tensor, step_index: int, weight: float
    ) -> dict[str, float]:
        """``fast_params="head"`` / ``"last_stage"``: the trunk runs forward and backward once.

        The fast weights start at ``self._trunk_start``; everything before it (the trunk) is
        the same for the student and every fast-weight student. Its output ``h`` is taken from
        the student's forward and detached: the synthetic sets run the suffix on it, their
        meta-gradient is collected at ``h``, and that gradient goes back through the trunk
        once, with the cross-entropy's (see `noisy_meta.shared_trunk`).
        """
        module, start = self.module, self._trunk_start
        with self.forward_context():
            with capture_input(start) as captured:
                logits = module(inputs)
            self._check_outputs(logits, targets)
            ce_loss = F.cross_entropy(upcast(logits), targets)
            synthetic, mentor_log_probs = self._synthetic_targets(inputs, targets)
            trunk_output = captured.value.detach().requires_grad_()
            if self.config.fast_params == "head":
                suffix, suffix_inputs, resume = start, trunk_output, contextlib.nullcontext()
            else:
                suffix, suffix_inputs = module, inputs[:TRUNK_SAMPLES]
                resume = resumed_at(module, start, trunk_output)
            with resume:
                # The suffix once more, on the detached trunk output (buffers untouched), for the inner gradients.
                suffix_logits = forward_with_cloned_buffers(suffix, dict(suffix.named_parameters()), suffix_inputs)
                losses = self._meta_losses(suffix_inputs, suffix_logits, synthetic.labels, mentor_log_probs, suffix)
                meta_loss, trunk_grad = self._backward_meta_losses(losses, synthetic.labels.shape[0], weight, trunk_output)
            self._add_grad(ce_loss, through=(captured.value, trunk_grad))
        return self._finish_joint_step(step_index, ce_loss, meta_loss, synthetic.changed_fraction, weight)

    def _shared_trunk_start(self) -> nn.Module | None:
        """Where the fast weights start, when the trunk before it can be shared (joint rule, timm model)."""
        module, spec = self.module, self.config.fast_params
        if self.config.update_rule != "joint" or not is_timm_classifier(module) or spec not in ("head", "last_stage"):
            return None
        start = module.get_classifier() if spec == "head" else module.get_submodule(last_stage_name(module))
        return start if isinstance(start, nn.Module) else None

    def _trunk_is_shared(self, inputs: torch.Tensor) -> bool:
        """Check once that the model run from the start of the fast weights is the model."""
        if self._trunk_shared is None:
            with self.forward_context():
                start_is_last = self.config.fast_params == "head"
                self._trunk_shared = suffix_matches_model(self.module, self._trunk_start, inputs, start_is_last)
        return self._trunk_shared

    def _sequential_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        step_index, weight = self.num_updates, self.meta_weight
        meta_loss = changed = torch.zeros((), device=inputs.device)
        meta_applied = True
        if weight > 0.0:
            with self.forward_context():
                logits = forward_with_cloned_buffers(self.module, dict(self.module.named_parameters()), inputs)
                self._check_outputs(logits, targets)
                meta_loss, changed = self._accumulate_meta_gradient(inputs, targets, logits, weight)
            del logits
            meta_applied = self._apply_update(meta_loss)
        logits = self.module(inputs)
        self._check_outputs(logits, targets)
        ce_loss = F.cross_entropy(upcast(logits), targets)
        self._add_grad(ce_loss)
        applied = self._apply_update(ce_loss)
        self._finish_iteration(applied, applied and meta_applied)
        return self._stats(step_index, ce_loss, meta_loss, changed, weight, skipped=not (applied and meta_applied))

    def _accumulate_meta_gradient(
        self, inputs: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor, weight: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``weight * grad mean_m J_m`` to ``.grad``, one pass at a time; return (J, changed)."""
        if weight == 0.0:
            zero = torch.zeros((), device=logits.device)
            return zero, zero
        synthetic, mentor_log_probs = self._synthetic_targets(inputs, targets)
        losses = self._meta_losses(inputs, logits, synthetic.labels, mentor_log_probs)
        meta_loss, _ = self._backward_meta_losses(losses, synthetic.labels.shape[0], weight)
        return meta_loss, synthetic.changed_fraction

    def _backward_meta_losses(
        self, losses: Iterator[torch.Tensor], num_sets: int, weight: float, wrt: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add ``weight * grad mean_m J_m`` to ``.grad`` as the passes come; return (J, grad at ``wrt``)."""
        retain = not self.config.first_order or num_sets == 0  # M = 0: the loss is on the student's graph
        num_sets = max(num_sets, 1)  # M = 0: one consistency loss
        total, wrt_grad = None, None
        with explain_double_backward_errors():
            for pass_losses in losses:
                grad = self._add_grad(pass_losses.sum() * (weight / num_sets), retain_graph=retain, wrt=wrt)
                if wrt is not None:
                    wrt_grad = grad if wrt_grad is None else wrt_grad + grad
                total = pass_losses.detach().sum() if total is None else total + pass_losses.detach().sum()
        return total / num_sets, wrt_grad

    def _meta_losses(
        self,
        inputs: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        mentor_log_probs: torch.Tensor,
        module: nn.Module | None = None,
    ) -> Iterator[torch.Tensor]:
        """`meta_losses` of the student, or of its classifier alone on ``inputs`` = its features."""
        module = self.module if module is None else module
        if module is self.module:
            fast_names = self._fast_names
        else:
            fast_names = [name for name, p in module.named_parameters() if p.requires_grad]
        config = self.config
        return meta_losses(
            module,
            inputs,
            upcast(logits),
            labels,
            mentor_log_probs,
            fast_names,
            config.inner_lr,
            config.first_order,
            self.runtime.loss_scale(),
            config.sets_per_pass,
        )

    def _synthetic_targets(self, inputs: torch.Tensor, targets: torch.Tensor):
        """Synthetic label sets and the mentor's log-probabilities for a batch."""
        config = self.config
        source = config.feature_source
        if config.num_synthetic == 0:  # the consistency-only ablation: no neighbours needed
            return _no_synthetic_sets(targets), F.log_softmax(upcast(self._mentor_logits(inputs)), dim=1)
        if source == "mentor":
            mentor_logits, features = logits_and_features(self._mentor, inputs)
        else:
            mentor_logits = self._mentor_logits(inputs)
            if source == "student":
                features = features_of(self.module, inputs)
            elif isinstance(source, nn.Module):
                features = features_of(source, inputs)
            else:
                with torch.no_grad():
                    features = source(inputs)
        self._check_features(features, inputs.shape[0])
        neighbors = nearest_neighbors(features, config.num_neighbors)
        synthetic = neighbor_label_transfer(
            targets, neighbors, config.num_synthetic, config.perturb_ratio, self._generator(targets.device)
        )
        mentor_log_probs = F.log_softmax(upcast(mentor_logits.detach()), dim=1)
        return synthetic, mentor_log_probs

    @torch.no_grad()
    def _mentor_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        with eval_mode(self._mentor):
            return self._mentor(inputs)

    def _add_grad(
        self,
        loss: torch.Tensor,
        retain_graph: bool = False,
        wrt: torch.Tensor | None = None,
        through: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> torch.Tensor | None:
        """Add the gradient of ``loss`` (scaled as ``accelerator.backward`` would) to ``.grad``.

        ``wrt``: also return the gradient with respect to that tensor. ``through``: a
        ``(tensor, gradient)`` pair backpropagated together with ``loss`` (a gradient already
        scaled, e.g. one returned for ``wrt``). ``autograd.grad`` rather than ``backward``: it
        never fires DDP's reducer hooks.
        """
        outputs, grad_outputs = [self.runtime.scale_loss(loss)], [None]
        if through is not None and through[1] is not None and through[0].requires_grad:  # else: a frozen trunk
            outputs.append(through[0])
            grad_outputs.append(through[1])
        inputs = self._params if wrt is None else [*self._params, wrt]
        grads = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph, allow_unused=True)
        with torch.no_grad():
            for param, grad in zip(self._params, grads):
                if grad is None:
                    continue
                if param.grad is None:
                    param.grad = grad
                else:
                    param.grad.add_(grad)
        return grads[-1] if wrt is not None else None

    def _apply_update(self, *losses: torch.Tensor) -> bool:
        """All-reduce, clip and apply the gradient unless something is not finite; zero it after.

        Returns whether the parameters were updated.
        """
        runtime = self.runtime
        losses_finite = bool(torch.stack([torch.isfinite(loss).all() for loss in losses]).all())
        ok = runtime.all_reduce_gradients(self._params, losses_finite)
        if ok and self.config.clip_grad is not None:
            runtime.clip_gradients(self._params, self.config.clip_grad)
        if ok and runtime.scaler is None:  # a GradScaler checks the gradients itself
            checks = [p.grad.isfinite().all() for p in self._params if p.grad is not None]
            ok = not checks or bool(torch.stack(checks).all())
        applied = ok and runtime.optimizer_step()
        self._zero_grad()
        self._accumulating = False
        return applied

    def _zero_grad(self) -> None:
        for param in self._params:
            param.grad = None

    def _finish_iteration(self, stepped: bool, complete: bool) -> None:
        if stepped:
            self.update_mentor()
        if not complete:
            self.num_skipped += 1

    def _stats(
        self,
        step_index: int,
        ce_loss: torch.Tensor,
        meta_loss: torch.Tensor,
        changed: torch.Tensor,
        weight: float,
        skipped: bool,
    ) -> dict[str, float]:
        dtype = torch.promote_types(ce_loss.dtype, meta_loss.dtype)
        values = torch.stack([ce_loss.detach().to(dtype), meta_loss.to(dtype), changed.to(dtype)])
        ce, meta, changed_fraction = values.tolist()
        return {
            "loss": ce + weight * meta,
            "ce_loss": ce,
            "meta_loss": meta,
            "meta_weight": weight,
            "labels_changed": changed_fraction,
            "mentor_decay": self.config.mentor_decay_at(step_index),
            "skipped": float(skipped),
            "num_skipped": float(self.num_skipped),
            "step": float(self.num_updates),
        }

    # ------------------------------------------------------------------ set-up and checks

    def _build_mentor(self, mentor: nn.Module | None) -> tuple[ModelEmaV3 | None, nn.Module]:
        source = self.module if mentor is None else unwrap_model(mentor)
        if mentor is not None and self.config.mentor_update == "ema":
            _check_same_state_layout(self.module, source)
        device = self._params[0].device
        if self.config.mentor_update == "ema":
            ema = ModelEmaV3(source, decay=self.config.mentor_decay_ramp)
            ema.module.to(device)
            ema.module.requires_grad_(False)
            return ema, ema.module
        frozen = copy.deepcopy(source).eval().to(device).requires_grad_(False)
        return None, frozen

    def _shared_seed(self, seed: int | None) -> int:
        """``seed``, or one drawn from the global RNG; rank 0's on every rank."""
        if seed is None:
            seed = int(torch.randint(2**62, (1,)).item())
        if self.runtime.process_group is not None:
            value = torch.tensor([seed], dtype=torch.int64, device=self._params[0].device)
            self.runtime.broadcast_from_first_rank(value)
            seed = int(value.item())
        return seed

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self._seed)
            self._generators[device] = generator
        return generator

    @contextlib.contextmanager
    def _restore_on_failure(self) -> Iterator[None]:
        """Undo buffer updates and drop gradients when the iteration raises or is skipped."""
        buffers = [b for b in self.module.buffers()]
        saved = [b.clone() for b in buffers]
        skipped_before = self.num_skipped
        try:
            yield
        except BaseException:
            self._restore_buffers(buffers, saved)
            self._zero_grad()
            self._accumulating = False
            raise
        if self.num_skipped != skipped_before:
            self._restore_buffers(buffers, saved)

    @staticmethod
    @torch.no_grad()
    def _restore_buffers(buffers: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
        for buffer, value in zip(buffers, saved):
            buffer.copy_(value)

    def _check_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Refuse a bad batch before anything changes; return ``targets`` as int64 class indices."""
        if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError(
                f"inputs and targets must be tensors, got {type(inputs).__name__} and {type(targets).__name__}"
            )
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise TypeError(
                f"targets must hold integer class indices (torch.long), got {targets.dtype}; "
                "soft or one-hot labels are not supported"
            )
        if targets.ndim != 1:
            raise ValueError(f"targets must have shape [B], got {list(targets.shape)}")
        if inputs.ndim == 0 or inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"inputs and targets disagree on the batch size: inputs {list(inputs.shape)}, "
                f"targets {list(targets.shape)}"
            )
        batch_size, k = targets.shape[0], self.config.num_neighbors
        if batch_size <= k and self.config.num_synthetic > 0:
            raise ValueError(
                f"a batch of {batch_size} samples is too small for num_neighbors={k}: each sample "
                f"needs {k} other samples. Use batches of at least {k + 1} (e.g. drop_last=True in "
                "the DataLoader) or lower num_neighbors"
            )
        if isinstance(self._num_classes, int):
            self._check_label_range(targets, self._num_classes)
        return targets.long()  # int32 / int16 / uint8 labels work as well

    def _check_outputs(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        if not isinstance(outputs, torch.Tensor) or outputs.ndim != 2 or outputs.shape[0] != targets.shape[0]:
            shape = list(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
            raise ValueError(
                f"the model must return [B, C] logits for a batch of {targets.shape[0]}, got {shape}"
            )
        if not outputs.is_floating_point():
            raise ValueError(f"the model must return floating-point logits, got {outputs.dtype}")
        if outputs.shape[1] != self._num_classes:  # else `_check_batch` already checked the range
            self._check_label_range(targets, outputs.shape[1])

    @staticmethod
    def _check_label_range(targets: torch.Tensor, num_classes: int) -> None:
        low, high = torch.stack([targets.min(), targets.max()]).tolist()
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"targets must lie in [0, {num_classes}) for a {num_classes}-class model, "
                f"got values from {low} to {high}"
            )

    @staticmethod
    def _check_features(features: torch.Tensor, batch_size: int) -> None:
        if not isinstance(features, torch.Tensor) or features.ndim < 2 or features.shape[0] != batch_size:
            shape = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"neighbour features must have shape [B, ...] with B={batch_size}, got {shape}")


def _no_synthetic_sets(targets: torch.Tensor) -> SyntheticLabels:
    """Zero synthetic label sets for a batch (``num_synthetic=0``)."""
    empty = targets.new_empty((0, targets.shape[0]))
    return SyntheticLabels(empty, empty.bool(), targets.new_empty((targets.shape[0], 0)), torch.zeros((), device=targets.device))


def _check_same_state_layout(student: nn.Module, mentor: nn.Module) -> None:
    """An EMA mentor must have the student's state-dict names and shapes."""
    student_state, mentor_state = student.state_dict(), mentor.state_dict()
    layout = {name: tuple(t.shape) for name, t in student_state.items()}
    other = {name: tuple(t.shape) for name, t in mentor_state.items()}
    if layout != other:
        differing = sorted(set(layout.items()) ^ set(other.items()))[:5]
        raise ValueError(
            "an EMA mentor must have the student's architecture (same state-dict names and shapes); "
            f"first differences: {differing}. Use mentor_update='frozen' for a different architecture"
        )
