"""FSDP2 against DDP, run by tests/test_fsdp.py under two real processes (gloo on CPU).

``accelerate launch --multi_gpu --num_processes 2 tests/fsdp_worker.py RESULT.json``: the same model, seeds and
per-rank batches trained by `MetaNoiseWrapper.step` under DDP and under FSDP2 (`noisy_meta.fully_shard_trunk`:
each block sharded; the head, or the last stage and the head, left whole as the fast weights; a LoRA model too).
Rank 0 writes how far apart the two runs' students and mentors are, how each model was sharded, each run's
parameter memory per process, how far a run saved with torch.distributed.checkpoint and resumed into new objects
ends from the uninterrupted one, and the messages of what FSDP2 refuses.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from noisy_meta import MetaNoiseWrapper, fully_shard_trunk
from noisy_meta.finetune.models import add_lora
from noisy_meta.timm import MetaNoiseTask

import helpers
from helpers import FROM_FIRST_UPDATE, tiny_resnet

SETTINGS = dict(num_synthetic=2, num_neighbors=3, mentor_decay_ramp=0.5, fast_params="head", seed=0)
#: The runs compared with DDP: the fast weights, the global norm they clip to, and whether the trunk has LoRA adapters.
RUNS = {
    "head": ("head", None, False),
    "head_clipped": ("head", 0.5, False),
    "last_stage": ("last_stage", None, False),
    "lora_head": ("head", None, True),
}
UPDATES = 3


def batch(step: int, rank: int):
    return helpers.image_batch(100 * step + rank, batch_size=8, size=32)


def sharding_layout(model: torch.nn.Module) -> dict:
    """Which modules `fully_shard_trunk` made FSDP2 units, and which parameters it left whole."""
    return {
        "units": [name for name, module in model.named_modules() if isinstance(module, FSDPModule)],
        "whole": [name for name, p in model.named_parameters() if not hasattr(p, "to_local")],
    }


def sgd(model: torch.nn.Module, momentum: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=momentum)


def whole_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().double()
        for k, v in module.state_dict().items()
    }


def parameter_bytes(module: torch.nn.Module) -> int:
    local = [p.to_local() if hasattr(p, "to_local") else p for p in module.parameters()]
    return sum(t.numel() * t.element_size() for t in local)


def train(wrapper: MetaNoiseWrapper, rank: int) -> list[dict]:
    return [wrapper.step(*batch(step, rank)) for step in range(UPDATES)]


def sharded_run(mesh, **settings) -> tuple[torch.nn.Module, torch.optim.Optimizer, MetaNoiseWrapper]:
    """A fresh sharded student, its sharded mentor copy, SGD and the wrapper (seeded: every call builds the same)."""
    torch.manual_seed(0)
    model = tiny_resnet()
    mentor = fully_shard_trunk(copy.deepcopy(model), mesh=mesh)
    model = fully_shard_trunk(model, mesh=mesh)
    optimizer = sgd(model, momentum=0.9)
    return model, optimizer, MetaNoiseWrapper(model, optimizer, mentor=mentor, **SETTINGS, **FROM_FIRST_UPDATE)


def checkpoint_state(model, optimizer, wrapper) -> dict:
    """What a checkpoint holds: the sharded student, the optimizer, the meta step's state (mentor, counters, RNG)."""
    return {
        "model": model.state_dict(),
        "optim": get_optimizer_state_dict(model, optimizer),
        "meta": wrapper.state_dict(),
    }


def resume_difference(mesh, folder: str, rank: int) -> float:
    """Four updates uninterrupted against two, a checkpoint, new objects that load it, and two more."""
    model, _, wrapper = sharded_run(mesh)
    for step in range(4):
        wrapper.step(*batch(step, rank))
    first = sharded_run(mesh)
    for step in range(2):
        first[2].step(*batch(step, rank))
    dcp.save(checkpoint_state(*first), checkpoint_id=folder)
    resumed_model, resumed_optimizer, resumed = sharded_run(mesh)
    state = checkpoint_state(resumed_model, resumed_optimizer, resumed)
    dcp.load(state, checkpoint_id=folder)
    resumed_model.load_state_dict(state["model"])
    set_optimizer_state_dict(resumed_model, resumed_optimizer, state["optim"])
    resumed.load_state_dict(state["meta"])
    for step in range(2, 4):
        resumed.step(*batch(step, rank))
    pairs = [(resumed_model, model), (resumed.mentor, wrapper.mentor)]
    return max(float((whole_state(a)[k] - v).abs().max()) for a, b in pairs for k, v in whole_state(b).items())


def half_batches_match_the_full_batch(mesh, rank: int) -> tuple[float, dict]:
    """The meta weight 0 on a ViT (LayerNorm: nothing depends on the batch's other samples): two sharded processes
    on half-batches end where one process on the whole batch does; and how the ViT was sharded."""
    import timm

    torch.manual_seed(0)
    vit = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4)
    model = timm.create_model("vit_small_patch16_224", **vit)
    single, mentor = copy.deepcopy(model), copy.deepcopy(model)

    settings = {**SETTINGS, "meta_weight": 0.0}
    wrapper = MetaNoiseWrapper(
        fully_shard_trunk(model, mesh=mesh), sgd(model, 0.9), mentor=fully_shard_trunk(mentor, mesh=mesh), **settings
    )
    single_wrapper = MetaNoiseWrapper(single, sgd(single, 0.9), **settings)
    for step in range(3):
        inputs, targets = helpers.image_batch(step, batch_size=16, size=32)
        wrapper.step(inputs[8 * rank : 8 * rank + 8], targets[8 * rank : 8 * rank + 8])
        single_wrapper.step(inputs, targets)
    difference = max(float((whole_state(model)[k] - v).abs().max()) for k, v in whole_state(single).items())
    return difference, sharding_layout(model)


def through_accelerate(mesh, rank: int) -> float:
    """The sharded run with Accelerate's prepared optimizer and ``accelerator=`` (how ``accelerate launch`` users
    pass it) against the same run without: the global norm clipped at 0.5 by the library either way."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # the launch's process group
    states = []
    for prepared in (False, True):
        torch.manual_seed(0)
        model = tiny_resnet()
        mentor = fully_shard_trunk(copy.deepcopy(model), mesh=mesh)
        model = fully_shard_trunk(model, mesh=mesh)
        optimizer = accelerator.prepare(sgd(model, 0.9)) if prepared else sgd(model, 0.9)
        settings = {**SETTINGS, **FROM_FIRST_UPDATE, "clip_grad": 0.5}
        wrapper = MetaNoiseWrapper(
            model, optimizer, mentor=mentor, accelerator=accelerator if prepared else None, **settings
        )
        train(wrapper, rank)
        states.append(whole_state(model))
    return max(float((states[1][k] - v).abs().max()) for k, v in states[0].items())


def refusals(mesh) -> dict[str, str]:
    """The one-line messages of what the meta step cannot do under FSDP2."""
    messages = {}
    attempts = {
        "all_fast": lambda model, mentor: MetaNoiseWrapper(model, sgd(model), mentor=mentor, fast_params="all"),
        "no_mentor": lambda model, mentor: MetaNoiseWrapper(model, sgd(model), fast_params="head"),
        "other_mentor": lambda model, mentor: MetaNoiseWrapper(
            model, sgd(model), mentor=tiny_resnet(), fast_params="head"
        ),
        "timm_task": lambda model, mentor: MetaNoiseTask(model, verbose=False, fast_params="head"),
        "own_loop": lambda model, mentor: MetaNoiseWrapper(
            model, sgd(model), mentor=mentor, fast_params="head"
        ).meta_loss(*batch(0, 0), torch.zeros(8, 4)),
    }
    for name, attempt in attempts.items():
        torch.manual_seed(0)
        model = tiny_resnet()
        mentor = fully_shard_trunk(copy.deepcopy(model), mesh=mesh)
        try:
            attempt(fully_shard_trunk(model, mesh=mesh), mentor)
            messages[name] = "accepted"
        except (ValueError, NotImplementedError) as error:
            messages[name] = str(error)
    return messages


def main(path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results: dict = {}
    for run, (fast_params, clip, lora) in RUNS.items():
        torch.manual_seed(0)
        model = add_lora(tiny_resnet(), 4) if lora else tiny_resnet()
        sharded, mentor = copy.deepcopy(model), copy.deepcopy(model)
        ddp = DistributedDataParallel(model)
        settings = {**SETTINGS, **FROM_FIRST_UPDATE, "clip_grad": clip, "fast_params": fast_params}
        reference = MetaNoiseWrapper(ddp, sgd(ddp, momentum=0.9), **settings)
        reference_stats = train(reference, rank)
        fully_shard_trunk(sharded, fast_params, mesh=mesh), fully_shard_trunk(mentor, fast_params, mesh=mesh)
        wrapper = MetaNoiseWrapper(sharded, sgd(sharded, momentum=0.9), mentor=mentor, **settings)
        stats = train(wrapper, rank)
        pairs = [
            (whole_state(sharded), whole_state(model)),
            (whole_state(wrapper.mentor), whole_state(reference.mentor)),
        ]
        difference = max(float((ours[k] - theirs[k]).abs().max()) for ours, theirs in pairs for k in theirs)
        results[run] = {
            "max_difference": difference,
            "meta_losses": [s["meta_loss"] for s in stats],
            "reference_meta_losses": [s["meta_loss"] for s in reference_stats],
            "updates": wrapper.num_updates,
        }
        results[run]["layout"] = sharding_layout(sharded)
        if run == "head":
            results["parameter_bytes"] = {"ddp": parameter_bytes(model), "fsdp": parameter_bytes(sharded)}
    folder = [f"{path}.checkpoint"]
    dist.broadcast_object_list(folder)
    results["resume_difference"] = resume_difference(mesh, folder[0], rank)
    results["refusals"] = refusals(mesh)
    results["half_batch_max_difference"], results["vit_layout"] = half_batches_match_the_full_batch(mesh, rank)
    results["accelerate_difference"] = through_accelerate(mesh, rank)
    if rank == 0:
        with open(path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
