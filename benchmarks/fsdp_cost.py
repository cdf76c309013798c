"""FSDP2 against DDP on the CPU, two processes: memory and time per update of the recipe's meta step.

    python benchmarks/fsdp_cost.py [--cycles 3] [--write]

The ViT of `benchmarks/lora_cost.py` (12 blocks at width 192, 64 px images in 8 px patches,
batch 32 per process, 10 classes) trained by `MetaNoiseWrapper.step` with the fine-tuning recipe
(`MetaNoiseConfig.finetune`, its meta step every 5th update at full weight from the first) and
``fast_params="head"``, in two gloo processes: under DDP, and under FSDP2 with every block and
the rest sharded and the head left whole (the fast weights, `ignored_params`), the mentor the
student's sharded copy. Per process: the bytes of the parameters and of the optimizer's state
it holds, its peak resident memory above its resident memory after the imports (the whole run:
model, mentor, optimizer state, the step's graphs and the gathered blocks), and the time per
update (the mean over whole ``meta_every`` cycles after one warm-up cycle).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import speed  # noqa: E402
from results_file import write_section  # noqa: E402

MODES = ("DDP", "FSDP2")


def local_bytes(tensors) -> int:
    """Bytes of what this process holds of ``tensors`` (a DTensor's local shard)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def child(mode: str, cycles: int) -> dict[str, float]:
    import copy

    import timm
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from noisy_meta import MetaNoiseConfig, MetaNoiseWrapper

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    baseline = speed.resident_mib()
    model = timm.create_model(
        "vit_small_patch16_224", img_size=64, patch_size=8, embed_dim=192, num_heads=3, depth=12, num_classes=10
    )
    recipe = MetaNoiseConfig.finetune(ramp_start=0, ramp_end=0, seed=0, fast_params="head")
    if mode == "FSDP2":
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))

        def shard(module):
            for block in module.blocks:
                fully_shard(block, mesh=mesh)
            return fully_shard(module, mesh=mesh, ignored_params=set(module.get_classifier().parameters()))

        mentor = shard(copy.deepcopy(model))
        student = shard(model)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        wrapper = MetaNoiseWrapper(student, optimizer, recipe, mentor=mentor)
    else:
        student = DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        wrapper = MetaNoiseWrapper(student, optimizer, recipe)
    generator = torch.Generator().manual_seed(rank)
    inputs, targets = torch.randn(32, 3, 64, 64, generator=generator), torch.randint(0, 10, (32,), generator=generator)
    for _ in range(recipe.meta_every):  # warm-up: one cycle (the optimizer's state exists after it)
        wrapper.step(inputs, targets)
    started = time.perf_counter()
    for _ in range(cycles * recipe.meta_every):
        wrapper.step(inputs, targets)
    seconds = (time.perf_counter() - started) / (cycles * recipe.meta_every)
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim()]
    row = {
        "parameter_mib": local_bytes(student.parameters()) / 2**20,
        "mentor_mib": local_bytes(wrapper.mentor.parameters()) / 2**20,
        "optimizer_mib": local_bytes(state) / 2**20,
        "memory_mib": speed.peak_mib() - baseline,
        "seconds_per_update": seconds,
    }
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    dist.destroy_process_group()
    return {key: max(r[key] for r in rows) for key in row}  # the process that needs most


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=3, help="timed meta_every cycles per configuration")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        row = child(args.child, args.cycles)
        if os.environ.get("RANK") == "0":
            print(json.dumps(row))
        return {}
    results = {}
    for mode in MODES:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
        command = [*launcher, __file__, "--child", mode, "--cycles", str(args.cycles)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        output = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
        print(mode, results[mode], flush=True)
    ddp = results["DDP"]
    lines = [
        "| per process | student's parameters (MiB) | mentor's (MiB) | optimizer state (MiB) | peak memory (MiB) "
        "| s / update |",
        "|---|---|---|---|---|---|",
    ]
    for mode, row in results.items():
        cells = [
            f"{row[key]:.1f} ({row[key] / ddp[key]:.2f}x)" for key in ("parameter_mib", "mentor_mib", "optimizer_mib")
        ]
        memory = f"{row['memory_mib']:.0f} ({row['memory_mib'] / ddp['memory_mib']:.2f}x)"
        speed_cell = f"{row['seconds_per_update']:.3f} ({row['seconds_per_update'] / ddp['seconds_per_update']:.2f}x)"
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {memory} | {speed_cell} |")
    print("\n".join(lines))
    if args.write:
        command = "python benchmarks/fsdp_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
        header = f"## FSDP2 against DDP, two CPU processes (`{command}`)"
        note = (
            'ViT, 12 blocks at width 192, 64 px, batch 32 per process, the recipe with `fast_params="head"`, '
            "gloo on 2 cores; each figure the process that needs most, and against DDP's."
        )
        write_section("fsdp_cost", [header, "", note, "", *lines])
    return results


if __name__ == "__main__":
    main()
