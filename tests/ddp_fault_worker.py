"""Faults across ranks, run by tests/test_distributed.py under two real processes.

``accelerate launch --multi_gpu --num_processes 2 tests/ddp_fault_worker.py MODE``:

- ``raise``: rank 1 raises after one good step while rank 0 goes on into the next step's
  all-reduce; the launch must end (non-zero) instead of hanging.
- ``diverge``: rank 1's weights are changed; `check_ranks_agree` must raise on both ranks.
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from ddp_worker import SETTINGS, image_batch

from noisy_meta import MetaNoiseWrapper
from noisy_meta.finetune.trainer import check_ranks_agree

from helpers import tiny_resnet


def main() -> None:
    mode = sys.argv[1]
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = tiny_resnet()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05))
    wrapper = MetaNoiseWrapper(model, optimizer, accelerator=accelerator, **SETTINGS)
    wrapper.step(*image_batch(accelerator.process_index))
    if mode == "raise":
        if accelerator.process_index == 1:
            raise RuntimeError("injected failure on rank 1")
        for step in range(1, 1000):  # rank 0 would wait for rank 1 in the all-reduce forever
            wrapper.step(*image_batch(step))
    elif mode == "diverge":
        check_ranks_agree(accelerator, wrapper.module, wrapper.mentor)  # equal so far
        if accelerator.process_index == 1:
            with torch.no_grad():
                next(wrapper.module.parameters()).add_(1e-6)
        check_ranks_agree(accelerator, wrapper.module, wrapper.mentor)
    accelerator.end_training()


if __name__ == "__main__":
    main()
