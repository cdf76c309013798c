"""Cross-rank checks, run by tests/test_distributed.py under two real processes.

``accelerate launch --multi_gpu --num_processes 2 tests/ddp_worker.py RESULT.json`` (gloo on
CPU). Rank 0 writes what it found to RESULT.json.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from noisy_meta import MetaNoiseWrapper

import helpers
from helpers import FROM_FIRST_UPDATE, TinyMLP, tiny_resnet

SETTINGS = dict(num_synthetic=2, num_neighbors=3, mentor_decay_ramp=0.5, **FROM_FIRST_UPDATE)


def image_batch(seed: int):
    return helpers.image_batch(seed, batch_size=8, size=32)


def flat_state(wrapper: MetaNoiseWrapper) -> torch.Tensor:
    tensors = list(wrapper.module.state_dict().values()) + list(wrapper.mentor.state_dict().values())
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def identical_on_all_ranks(accelerator: Accelerator, tensor: torch.Tensor) -> bool:
    gathered = accelerator.gather(tensor.unsqueeze(0))
    return all(torch.equal(gathered[0], row) for row in gathered[1:])


def train_with_step(accelerator: Accelerator, **settings) -> MetaNoiseWrapper:
    torch.manual_seed(0)
    model = tiny_resnet()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    wrapper = MetaNoiseWrapper(model, optimizer, accelerator=accelerator, **SETTINGS, **settings)
    for step in range(4):  # each rank its own data
        stats = wrapper.step(*image_batch(100 * step + accelerator.process_index))
        assert stats["skipped"] == 0.0 and stats["meta_weight"] == 1.0
    return wrapper


def train_with_own_loop(accelerator: Accelerator) -> MetaNoiseWrapper:
    torch.manual_seed(0)
    model = tiny_resnet()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    wrapper = MetaNoiseWrapper(model, optimizer, accelerator=accelerator, **SETTINGS, seed=0)
    for step in range(4):
        inputs, targets = image_batch(100 * step + accelerator.process_index)
        with wrapper.forward_context():
            outputs = model(inputs)  # through DDP: its backward all-reduces meta + CE once
        wrapper.meta_backward(inputs, targets, outputs)
        accelerator.backward(F.cross_entropy(outputs, targets))
        optimizer.step()
        optimizer.zero_grad()
        wrapper.update_mentor()
    return wrapper


def half_batches_match_the_full_batch(accelerator: Accelerator) -> float:
    """Meta weight 0: two ranks on half-batches == one process on the full batch."""
    torch.manual_seed(0)
    model = TinyMLP()  # no BatchNorm: batch statistics would differ between half and full batches
    single = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(7)
    batches = [
        (torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)) for _ in range(3)
    ]

    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    wrapper = MetaNoiseWrapper(model, optimizer, accelerator=accelerator, **SETTINGS, meta_weight=0.0)
    single_wrapper = MetaNoiseWrapper(
        single, torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9), **SETTINGS, meta_weight=0.0
    )
    half = slice(8 * accelerator.process_index, 8 * accelerator.process_index + 8)
    for inputs, targets in batches:
        wrapper.step(inputs[half], targets[half])
        single_wrapper.step(inputs, targets)
    distributed = torch.nn.utils.parameters_to_vector(wrapper.module.parameters())
    reference = torch.nn.utils.parameters_to_vector(single.parameters())
    return float((distributed - reference).abs().max().detach())


def accumulation_paths(accelerator: Accelerator) -> tuple[MetaNoiseWrapper, MetaNoiseWrapper]:
    """Two updates of two micro-batches each: by `step`, and by an own loop through DDP's reducer."""
    wrappers = []
    for own_loop in (False, True):
        torch.manual_seed(0)
        model = tiny_resnet()
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
        wrapper = MetaNoiseWrapper(model, optimizer, accelerator=accelerator, **SETTINGS, seed=0)
        for micro in range(4):
            inputs, targets = image_batch(1000 + 10 * micro + accelerator.process_index)
            with accelerator.accumulate(model):
                if not own_loop:
                    wrapper.step(inputs, targets)
                    continue
                with wrapper.forward_context():
                    outputs = model(inputs)  # DDP: no_sync on the first micro-batch of each window
                wrapper.meta_backward(inputs, targets, outputs)
                accelerator.backward(F.cross_entropy(outputs, targets))
                optimizer.step()
                optimizer.zero_grad()
                wrapper.update_mentor()
        wrappers.append(wrapper)
    return wrappers[0], wrappers[1]


def main() -> None:
    accelerator = Accelerator(cpu=True)  # with `--multi_gpu` and 2 processes: MULTI_CPU over gloo
    results: dict[str, object] = {
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
    }
    for dist_bn in ("reduce", "broadcast"):
        wrapper = train_with_step(accelerator, dist_bn=dist_bn)
        results[f"step_{dist_bn}_identical"] = identical_on_all_ranks(accelerator, flat_state(wrapper))
        results[f"step_{dist_bn}_updates"] = wrapper.num_updates
    first_order = train_with_step(accelerator, first_order=True, seed=3)
    results["step_first_order_identical"] = identical_on_all_ranks(accelerator, flat_state(first_order))
    # the fast step sized in the predictions: each rank measures on its own data, every rank uses one radius
    sized = train_with_step(accelerator, inner_step="normalized", inner_divergence=0.05)
    scale = torch.tensor([sized.core.objective.step_size.scale], dtype=torch.float64)
    results["step_kl_sized_identical"] = identical_on_all_ranks(accelerator, torch.cat([flat_state(sized), scale]))
    own = train_with_own_loop(accelerator)
    results["own_loop_identical"] = identical_on_all_ranks(accelerator, flat_state(own))
    results["half_batch_max_difference"] = half_batches_match_the_full_batch(accelerator)

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)  # shares the process group
    by_step, by_own_loop = accumulation_paths(accelerator)
    results["accumulation_updates"] = [by_step.num_updates, by_own_loop.num_updates]
    results["accumulation_identical"] = identical_on_all_ranks(accelerator, flat_state(by_step))
    difference = torch.nn.utils.parameters_to_vector(by_step.module.parameters()) - torch.nn.utils.parameters_to_vector(
        by_own_loop.module.parameters()
    )
    results["accumulation_paths_max_difference"] = float(difference.detach().abs().max())
    if accelerator.is_main_process:
        with open(sys.argv[1], "w") as handle:
            json.dump(results, handle)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
