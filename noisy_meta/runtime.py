"""How gradients are scaled, synchronised and applied: plain PyTorch, Accelerate, DDP, AMP.

The meta step cannot run through ``DistributedDataParallel``: DDP's reducer expects one
backward per forward, and the meta-gradient needs ``autograd.grad`` with ``create_graph``
plus one backward per synthetic set. So `MetaNoiseWrapper.step` computes every gradient on
the unwrapped module, where DDP's hooks stay idle, and `TrainingRuntime` all-reduces the
finished gradient itself, exactly once per optimizer update, in one flat buffer. BatchNorm
running statistics, which each rank updates from its own data, are then made equal on all
ranks (``dist_bn``: averaged, or rank 0's copied), so the mentor, an average of parameters and
buffers, stays identical on every rank too.

Under FSDP2 (a student built with ``fully_shard``) the trunk's parameters are sharded and their
gradients reduce-scattered by FSDP2's own backward hooks: `TrainingRuntime.sharded` says so, the
last gradient of an update (the loss on the labels with the meta-gradient at the trunk's output)
is an ordinary backward (`noisy_meta.gradients.GradientUpdate.add`), and only the unsharded
parameters (the fast weights, which ``fully_shard(..., ignored_params=...)`` leaves whole) are
all-reduced here.

Mixed precision follows Accelerate: ``accelerator.autocast()`` around the forwards, and for
fp16 the GradScaler's scale on every backward, including the inner ``autograd.grad`` of the
fast-weight step (scaled there, unscaled before the fast weights are formed), so that the
scaler sees, and skips, an update whose gradients overflowed.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import SHARDABLE_FAST_PARAMS

#: Accelerate's modes the meta step refuses, and why (one line each; `TrainingRuntime` adds DeepSpeed's ZeRO stage).
_UNSUPPORTED_DISTRIBUTED = {
    "DEEPSPEED": "DeepSpeed's engine owns the backward and the gradient reduction, which the meta step must do "
    "itself (two backwards over one graph; ZeRO-3 cannot run that at all, DeepSpeed issue 4528)",
    "FSDP": "Accelerate shards every parameter, the fast weights too, which second order cannot reach; shard the "
    "trunk with noisy_meta.fully_shard_trunk(model, 'head') (the head whole) and pass the student, its sharded "
    "copy as mentor= and fast_params='head' to MetaNoiseWrapper (the docs' FSDP2 section; --fsdp on the command "
    "line)",
    "MEGATRON_LM": "the meta step needs the whole model on every process",
    "XLA": "the meta step is not traced for XLA",
}


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` (unwrapped) was sharded with FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a sharded parameter or its gradient)."""
    return type(tensor).__name__ == "DTensor"


def fully_shard_trunk(
    model: nn.Module, fast_params: str = "head", mesh: Any | None = None, **fully_shard_kwargs: Any
) -> nn.Module:
    """Shard a timm model with FSDP2 for the meta step: the trunk sharded, the fast weights whole on every process.

    Second order cannot reach a sharded parameter (FSDP2 gathers it into other tensors for each forward), so the
    meta step under FSDP2 runs ANIL's way: ``fast_params`` (``"head"`` or ``"last_stage"``) stays whole
    (``ignored_params``), the trunk before it runs once and its gradient is reduce-scattered by FSDP2's own
    backward. Each block of the model's block lists (a ViT's ``blocks``, a ResNet's ``layer1``..``layer4``, a
    ConvNeXt's ``stages``) that holds no fast weight becomes one FSDP2 unit, the model the root; a PEFT model is
    sharded around its timm model, its adapters with the blocks they are in. Returns ``model``, sharded in place.
    Build the mentor the same way from a copy taken before (``copy.deepcopy(model)``: FSDP2 modules cannot be
    copied) and pass it as ``mentor=``. ``mesh`` (default: every process) and ``fully_shard_kwargs``
    (``mp_policy``, ``reshard_after_forward``, ...) go to every ``fully_shard`` call.
    """
    from torch.distributed.fsdp import fully_shard

    from .fast_weights import select_fast_params

    if fast_params not in SHARDABLE_FAST_PARAMS:
        raise ValueError(
            f"fast_params={fast_params!r}: under FSDP2 the fast weights must be a suffix left whole, "
            f"{' or '.join(map(repr, SHARDABLE_FAST_PARAMS))} (second order cannot reach sharded parameters)"
        )
    whole = {model.get_parameter(name) for name in select_fast_params(model, fast_params)}
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    for child in base.children():
        blocks = list(child.children()) if isinstance(child, (nn.Sequential, nn.ModuleList)) else []
        for block in blocks:
            parameters = set(block.parameters())
            if parameters and not parameters & whole:
                fully_shard(block, mesh=mesh, **fully_shard_kwargs)
    return fully_shard(model, mesh=mesh, ignored_params=whole, **fully_shard_kwargs)


def find_ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The ``DistributedDataParallel`` wrapper in ``model`` (under ``torch.compile`` too), if any."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner


class TrainingRuntime:
    """Gradient scaling, accumulation, all-reduce and optimizer stepping for one model.

    Args:
        model: the model as the user holds it (possibly DDP-wrapped by ``accelerator.prepare``).
        optimizer: its optimizer (possibly Accelerate's ``AcceleratedOptimizer``).
        accelerator: an ``accelerate.Accelerator``; it provides autocast, the GradScaler,
            gradient accumulation and the process group.
        scaler: a ``torch.amp.GradScaler`` for fp16 without Accelerate.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        accelerator: Any | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if isinstance(model, nn.DataParallel):
            raise NotImplementedError(
                "nn.DataParallel is not supported (it replicates the model on every call, which the "
                "meta step cannot differentiate through); use DistributedDataParallel, e.g. through "
                "`accelerate launch`"
            )
        if accelerator is not None:
            kind = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
            if kind in _UNSUPPORTED_DISTRIBUTED:
                plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
                stage = f" ZeRO-{plugin.zero_stage}" if getattr(plugin, "zero_stage", None) is not None else ""
                raise NotImplementedError(
                    f"Accelerate's {kind}{stage} mode is not supported: {_UNSUPPORTED_DISTRIBUTED[kind]}; "
                    "use plain multi-GPU / multi-CPU data parallelism (DDP)"
                )
            if scaler is not None:
                raise ValueError("pass either an accelerator or a scaler, not both: the accelerator owns its scaler")
            scaler = accelerator.scaler
        self.accelerator = accelerator
        self.optimizer = optimizer
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        #: FSDP2: the trunk's parameters are sharded and FSDP2 reduces their gradients (see the module's docstring).
        self.sharded = is_sharded(getattr(model, "_orig_mod", model))
        ddp = find_ddp(model)
        if ddp is not None:
            self.use_process_group(ddp.process_group)
        elif self.sharded:
            self.use_process_group(world_group())
        elif accelerator is not None and accelerator.num_processes > 1:
            self.use_process_group(world_group())  # a part of a DDP-wrapped model (an adapter's timm_model)
        else:
            self.use_process_group(None)

    def use_process_group(self, group: Any | None) -> None:
        """Synchronise over ``group`` (None: nothing): for a student that is part of a DDP-wrapped
        module, whose DDP wrapper this runtime cannot find (a Lightning or Trainer adapter's)."""
        self.process_group = group if group is not None and dist.get_world_size(group) > 1 else None
        self.world_size = dist.get_world_size(group) if self.process_group is not None else 1

    # ------------------------------------------------------------------ per micro-batch

    @property
    def ends_update(self) -> bool:
        """Whether this micro-batch ends an update: False on the micro-batches of an ``accelerator.accumulate``
        window that only accumulate (Accelerate's ``sync_gradients``)."""
        return True if self.accelerator is None else bool(self.accelerator.sync_gradients)

    @property
    def accumulation_steps(self) -> int:
        return 1 if self.accelerator is None else int(self.accelerator.gradient_accumulation_steps)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Accelerate's autocast (a no-op without an accelerator or mixed precision)."""
        return self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()

    def loss_scale(self) -> float:
        """The GradScaler's current scale (a power of two), or 1."""
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` as ``accelerator.backward`` would differentiate it: / accumulation, * scale."""
        steps = self.accumulation_steps
        if steps != 1:
            loss = loss / steps
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        return loss

    # ------------------------------------------------------------------ per update

    @torch.no_grad()
    def all_reduce_gradients(self, params: list[nn.Parameter], local_ok: bool = True) -> bool:
        """Average the gradients over ranks in one all-reduce; True if every rank is ``local_ok``.

        Alongside the gradients go one "has a gradient" count per parameter and the
        ``local_ok`` flag, so a parameter keeps ``grad=None`` only when no rank produced a
        gradient for it (as without distribution), and a non-finite loss on one rank makes
        every rank skip the update.
        """
        if self.process_group is None:
            return local_ok
        params = [p for p in params if not is_dtensor(p)]  # FSDP2 reduced the sharded ones in its backward
        reference = params[0]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        markers = [float(p.grad is not None) for p in params] + [0.0 if local_ok else 1.0]
        flags = torch.tensor(markers, device=reference.device, dtype=torch.float32)
        reduced = self._all_reduce_mean(grads + [flags])
        flags = reduced.pop()
        has_grad = (flags[:-1] > 0).tolist()
        for p, grad, present in zip(params, reduced, has_grad):
            p.grad = grad if present else None
        return bool(flags[-1] == 0)

    def clip_gradients(self, params: list[nn.Parameter], max_norm: float) -> None:
        """Unscale (fp16) and clip the global gradient norm to ``max_norm``."""
        if self.accelerator is not None and not self.sharded:
            self.accelerator.clip_grad_norm_(params, max_norm)
            return
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if not self.sharded:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return
        # one global norm over sharded (DTensor) and whole gradients: each process squares its shards, one
        # all-reduce sums them, the whole ones (equal on every process after their all-reduce) are added once
        grads = [p.grad for p in params if p.grad is not None]
        sharded = [g.to_local() for g in grads if is_dtensor(g)]
        whole = [g for g in grads if not is_dtensor(g)]
        zero = torch.zeros((), device=grads[0].device)
        squares = torch.stack([torch.linalg.vector_norm(g.float()) ** 2 for g in sharded] or [zero])
        sharded_square = squares.sum()
        if self.process_group is not None:
            dist.all_reduce(sharded_square, group=self.process_group)
        whole_square = sum((torch.linalg.vector_norm(g.float()) ** 2 for g in whole), zero)
        coefficient = (max_norm / (torch.sqrt(sharded_square + whole_square) + 1e-6)).clamp(max=1.0)
        for grad in sharded + whole:  # a shard scaled in place scales its DTensor
            grad.mul_(coefficient.to(grad.dtype))

    def optimizer_step(self) -> bool:
        """Step the optimizer; return whether it updated the parameters.

        With a GradScaler, the scaler decides (it skips, and lowers its scale, on inf/NaN
        gradients); without one the step is always made (the caller checked the gradients).
        """
        if self.scaler is None:
            self.optimizer.step()
            return True
        before = self.scaler.get_scale()
        if self.accelerator is not None:
            self.optimizer.step()  # AcceleratedOptimizer: scaler.step + scaler.update
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return not self.scaler.get_scale() < before

    def back_off(self) -> None:
        """An update skipped before the optimizer step (a non-finite loss): lower the GradScaler's scale.

        The scaler lowers its scale when it finds inf/NaN *gradients*; an inner fast-weight
        gradient that overflowed at this scale makes the meta *loss* non-finite instead, and
        the update is skipped before the scaler sees it. Without this the scale would stay
        where it overflowed and every later update would be skipped too. No-op without fp16.
        """
        if self.scaler is not None:
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())

    @torch.no_grad()
    def sync_buffers(self, module: nn.Module, mode: str) -> None:
        """Make floating-point buffers (BatchNorm statistics) equal on all ranks.

        ``mode="reduce"`` averages them (timm's ``--dist-bn reduce``); ``"broadcast"`` copies
        rank 0's, as DDP does before every forward. Integer buffers such as
        ``num_batches_tracked`` are equal on all ranks already.
        """
        if self.process_group is None:
            return
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if not buffers:
            return
        if mode == "reduce":
            values = self._all_reduce_mean(buffers)
        else:
            values = self._flat_collective(buffers, self.broadcast_from_first_rank)
        for buffer, value in zip(buffers, values):
            buffer.copy_(value)

    def _all_reduce_mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        def mean(flat: torch.Tensor) -> None:
            dist.all_reduce(flat, group=self.process_group)
            flat.div_(self.world_size)

        return self._flat_collective(tensors, mean)

    def shared_seed(self, seed: int | None, device: torch.device) -> int:
        """``seed``, or one derived from PyTorch's global seed (no draw); rank 0's on every rank."""
        return shared_seed(seed, device, self.process_group)

    def broadcast_from_first_rank(self, tensor: torch.Tensor) -> None:
        """Overwrite ``tensor`` in place with the first rank's copy."""
        broadcast_from_first_rank(tensor, self.process_group)

    @staticmethod
    def _flat_collective(tensors: list[torch.Tensor], collective) -> list[torch.Tensor]:
        """Run ``collective`` in place on one flat buffer per dtype; new tensors shaped like ``tensors``."""
        by_dtype: dict[torch.dtype, list[int]] = {}
        for index, tensor in enumerate(tensors):
            by_dtype.setdefault(tensor.dtype, []).append(index)
        results: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
        for indices in by_dtype.values():
            flat = torch.cat([tensors[i].reshape(-1) for i in indices])
            collective(flat)
            for i, chunk in zip(indices, flat.split([tensors[i].numel() for i in indices])):
                results[i] = chunk.view_as(tensors[i])
        return results


def shared_seed(seed: int | None, device: torch.device, group: Any | None) -> int:
    """``seed``, or one derived from PyTorch's global seed; the first rank's of ``group`` (None: this process's).

    The derived seed reads ``torch.initial_seed()`` (what ``torch.manual_seed`` or a framework's
    ``set_seed`` set) without drawing from the global RNG: building the meta step then leaves the
    random stream of the run's augmentation and shuffling where the framework put it, so a run
    resumed by a framework that restores its RNG states equals the uninterrupted one.
    """
    if seed is None:
        seed = (torch.initial_seed() * SEED_MULTIPLIER + 1) % 2**62  # not the global seed itself: another stream
    if group is not None:
        value = torch.tensor([seed], dtype=torch.int64, device=device)
        broadcast_from_first_rank(value, group)
        seed = int(value.item())
    return seed


#: Mixes the global seed into the synthetic labels' seed (an odd 64-bit constant, as splitmix64's).
SEED_MULTIPLIER = 0x9E3779B97F4A7C15


def broadcast_from_first_rank(tensor: torch.Tensor, group: Any) -> None:
    """Overwrite ``tensor`` in place with the copy of ``group``'s first rank."""
    dist.broadcast(tensor, src=dist.get_process_group_ranks(group)[0], group=group)


def world_group() -> Any | None:
    """The default process group when several processes run, else None."""
    running = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return dist.group.WORLD if running else None
