"""A training loop in the exact order of timm's ``train.py`` ``train_one_epoch``, for task tests.

autocast -> ``task(input, target)`` -> loss / accumulation steps -> the scaler's backward (or
``loss.backward()``), under ``task.no_sync()`` on micro-batches that only accumulate -> on an
update: clip -> optimizer step (both inside ``NativeScaler.__call__`` with AMP) -> ``zero_grad``
-> ``task.update_ema(step=num_updates)``.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def train_like_timm(
    task,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    loss_scaler=None,
    accum_steps: int = 1,
    clip_grad: float | None = None,
    amp_autocast=nullcontext,
    num_updates: int = 0,
) -> int:
    """Train ``task`` on ``batches``; returns the update count (``num_updates`` more per update made)."""
    optimizer.zero_grad()
    for index, (input, target) in enumerate(batches):
        need_update = (index + 1) % accum_steps == 0 or index + 1 == len(batches)

        def _forward(input=input, target=target):
            with amp_autocast():
                loss = task(input, target)["loss"]
            if accum_steps > 1:
                loss = loss / accum_steps
            return loss

        def _backward(loss, need_update=need_update):
            if loss_scaler is not None:
                loss_scaler(
                    loss,
                    optimizer,
                    clip_grad=clip_grad,
                    parameters=task.get_clip_parameters(),
                    create_graph=False,
                    need_update=need_update,
                )
            else:
                loss.backward()
                if need_update:
                    if clip_grad is not None:
                        torch.nn.utils.clip_grad_norm_(task.get_clip_parameters(), clip_grad)
                    optimizer.step()

        with task.no_sync() if not need_update else nullcontext():
            _backward(_forward())
        if not need_update:
            continue
        num_updates += 1
        optimizer.zero_grad()
        task.update_ema(step=num_updates)
    return num_updates
