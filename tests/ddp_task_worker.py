"""`MetaNoiseTask` under two real processes, run by tests/test_timm_task.py.

``accelerate launch --multi_gpu --num_processes 2 tests/ddp_task_worker.py RESULT.json`` (gloo
on CPU). The task is wrapped by its own `prepare_distributed` (DDP) and trained in timm's
``train_one_epoch`` order; the reference is `MetaNoiseWrapper.step` on an Accelerate-prepared
copy, on the same per-rank data. Rank 0 writes what it found to RESULT.json.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
from accelerate import Accelerator
from timm_loop import train_like_timm

from noisy_meta import MetaNoiseConfig, MetaNoiseWrapper
from noisy_meta.timm import MetaNoiseTask

import helpers
from helpers import settings, tiny_resnet


def flat(*modules: torch.nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for m in modules for t in m.state_dict().values()])


def compare(accelerator: Accelerator, dtype: torch.dtype, accumulate: int, updates: int) -> dict:
    """Both ways trained for ``updates`` updates of ``accumulate`` micro-batches, in ``dtype``."""
    config = settings(first_order=False)
    micro_batches = [
        (inputs.to(dtype), targets)
        for inputs, targets in (
            helpers.image_batch(100 * step + accelerator.process_index) for step in range(accumulate * updates)
        )
    ]
    torch.manual_seed(0)
    model = tiny_resnet().to(dtype)
    reference_model = copy.deepcopy(model)

    task = MetaNoiseTask(model, verbose=False, config=MetaNoiseConfig(), **config).prepare_distributed()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    done = train_like_timm(task, optimizer, micro_batches, accum_steps=accumulate)

    accelerator.gradient_accumulation_steps = accumulate
    prepared, reference_optimizer = accelerator.prepare(
        reference_model, torch.optim.SGD(reference_model.parameters(), lr=0.05, momentum=0.9)
    )
    reference = MetaNoiseWrapper(prepared, reference_optimizer, accelerator=accelerator, **config)
    for inputs, targets in micro_batches:
        with accelerator.accumulate(prepared):
            reference.step(inputs, targets)

    ours, theirs = flat(model, task.mentor), flat(reference.module, reference.mentor)
    gathered = accelerator.gather(ours.unsqueeze(0))
    name = f"{str(dtype).removeprefix('torch.')}_accumulate_{accumulate}"
    return {
        f"{name}_updates": done,
        f"{name}_reference_updates": reference.num_updates,
        f"{name}_max_difference": float((ours - theirs).abs().max()),
        f"{name}_ranks_identical": all(torch.equal(gathered[0], row) for row in gathered[1:]),
    }


def main() -> None:
    accelerator = Accelerator(cpu=True)
    results = {"world_size": accelerator.num_processes}
    # float32: the first update (1e-6); float64: several, accumulated or not (1e-10).
    for dtype, accumulate, updates in ((torch.float32, 1, 1), (torch.float64, 1, 3), (torch.float64, 2, 2)):
        results.update(compare(accelerator, dtype, accumulate, updates))
    if accelerator.is_main_process:
        with open(sys.argv[1], "w") as handle:
            json.dump(results, handle)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
