"""Processes: building the Accelerator, and checking that every rank holds the same model.

`make_accelerator` turns a multi-process launch on a machine without an accelerator into
CPU processes (gloo); `check_ranks_agree` compares every rank's weights with one small
all-gather (after ``--resume``, where a bad load would otherwise go unnoticed).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from .names import TRACKING_DIR
from .settings import RunSettings
from .tracking import check_trackers


def make_accelerator(settings: RunSettings) -> Accelerator:
    """The run's Accelerator; with several processes a collective waits at most ``--rank-timeout`` seconds.

    ``--log-with`` trackers are Accelerate's, local ones writing in ``<output-dir>/tracking/``
    (`noisy_meta.finetune.tracking`); one that is not installed is refused here.
    """
    output = settings.output
    check_trackers(output.log_with)
    accelerator = Accelerator(
        cpu=cpu_only_processes(),
        mixed_precision=settings.optim.mixed_precision,
        gradient_accumulation_steps=settings.optim.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=settings.control.rank_timeout))],
        log_with=list(output.log_with) or None,
        project_config=ProjectConfiguration(
            project_dir=str(output.output_dir), logging_dir=str(output.output_dir / TRACKING_DIR)
        ),
    )
    check_process_group(accelerator.num_processes)
    return accelerator


def check_process_group(num_processes: int) -> None:
    """Refuse to train when the launcher started several processes that did not form one group.

    Each would then train its own copy of the model on all the data and print everything.
    """
    launched = launched_processes()
    if launched > 1 and num_processes == 1:
        raise ValueError(
            f"launched as one of {launched} processes (WORLD_SIZE={launched}), but they did not form a process "
            "group, so each would train its own copy: launch with `accelerate launch --num_processes N` (add "
            "--multi_gpu only where there are GPUs) or torchrun, and check that MASTER_ADDR / MASTER_PORT reach "
            "every process"
        )


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 when launched plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


#: What gloo / NCCL say when a collective's peer stopped answering or went away.
_LOST_RANK_SIGNS = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "Watchdog")


def is_lost_rank(error: RuntimeError) -> bool:
    """Whether ``error`` is a collective that gave up on another rank (timeout or closed connection)."""
    return launched_processes() > 1 and any(sign in str(error) for sign in _LOST_RANK_SIGNS)


def lost_rank_message(error: RuntimeError, settings: RunSettings) -> str:
    """One line for a run that stopped because another rank died or stalled: which rank says so, and how to go on."""
    rank, world = os.environ.get("RANK", "?"), launched_processes()
    first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    last = os.path.join(settings.output.output_dir, "last")
    after = f"--resume continues from {last}/" if os.path.isdir(last) else "no checkpoint had been written yet"
    timeout = settings.control.rank_timeout
    return (
        f"rank {rank} of {world}: another rank stopped answering for --rank-timeout {timeout:g} s or went "
        f"away ({first_line}); stopping, {after}"
    )


def cpu_only_processes() -> bool:
    """Run on CPU processes (gloo) when launched with several processes on a machine with no accelerator."""
    world_size = launched_processes()
    has_accelerator = torch.cuda.is_available() or (hasattr(torch, "accelerator") and torch.accelerator.is_available())
    return world_size > 1 and not has_accelerator


def check_ranks_agree(accelerator: Accelerator, *modules: torch.nn.Module) -> None:
    """Raise on every rank unless all ranks hold bitwise the same parameters and buffers.

    Each rank sends one checksum per tensor (float64 sum and sum of squares); any difference
    names the first tensor that differs. One small all-gather: cheap enough after a resume.
    """
    if accelerator.num_processes == 1:
        return
    names, sums = [], []
    for number, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            values = tensor.detach().double().reshape(-1)
            names.append(f"module {number}: {name}")
            sums.append(torch.stack([values.sum(), (values * values).sum()]) if values.numel() else values.new_zeros(2))
    local = torch.stack(sums).to(accelerator.device)
    gathered = accelerator.gather(local.unsqueeze(0))
    differs = (gathered != gathered[0:1]).any(dim=0).any(dim=1).nonzero().flatten().tolist()
    if differs:
        raise RuntimeError(
            f"the {accelerator.num_processes} ranks hold different weights after loading ({len(differs)} tensors "
            f"differ, first {names[differs[0]]}); the checkpoint was not loaded the same on every rank"
        )
