"""LoRA against full fine-tuning on the CPU: time per update and the whole run's memory, plain and with the recipe.

    python benchmarks/lora_cost.py [--rank 16] [--write]

A ViT with 12 blocks at a reduced width (timm's ``vit_small`` layout at width 192, 3 heads,
64 px images in 8 px patches, batch 32, 10 classes). Seven configurations, each in its own
process: full fine-tuning and LoRA (PEFT, rank ``--rank`` on every linear layer of the blocks
via `noisy_meta.finetune.models.add_lora`, the classifier trained in full), each with a plain
cross-entropy step and with the fine-tuning recipe (`MetaNoiseConfig.finetune`, its meta step
every 5th update, at full weight from the first); on LoRA also the recipe with
``fast_params="head"`` / ``"last_stage"`` (the fast passes run only that part, on a shared trunk) and in first
order (no graph of the inner gradient).
Time per update: the mean over whole ``meta_every`` cycles after one warm-up cycle. Memory: the
process's peak resident memory above its resident memory after the imports, before the model is built (model, mentor,
optimizer state and the step's graphs: the whole run's cost).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import speed  # noqa: E402
from results_file import write_section  # noqa: E402

#: Each configuration and the MetaNoiseConfig.finetune overrides of its recipe (None: a plain cross-entropy step).
CONFIGS: dict[str, dict[str, object] | None] = {
    "full plain": None,
    "full recipe": {},
    "LoRA plain": None,
    "LoRA recipe": {},
    "LoRA recipe, head": {"fast_params": "head"},
    "LoRA recipe, last_stage": {"fast_params": "last_stage"},
    "LoRA recipe, first order": {"first_order": True},
}


def child(config: str, rank: int, cycles: int) -> dict[str, float]:
    import contextlib

    import timm
    import torch

    from noisy_meta import MetaNoiseConfig, MetaNoiseWrapper
    from noisy_meta.finetune.models import add_lora

    torch.manual_seed(0)
    baseline = speed.resident_mib()
    model = timm.create_model(
        "vit_small_patch16_224", img_size=64, patch_size=8, embed_dim=192, num_heads=3, depth=12, num_classes=10
    )
    if config.startswith("LoRA"):
        model = add_lora(model, rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    inputs, targets = torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))
    meta_every = MetaNoiseConfig.finetune().meta_every
    overrides = CONFIGS[config]
    if overrides is not None:
        recipe = MetaNoiseConfig.finetune(ramp_start=0, ramp_end=0, seed=0, **overrides)
        wrapper = MetaNoiseWrapper(model, optimizer, recipe)

        def update() -> None:
            wrapper.step(inputs, targets)
    else:
        update = speed.plain_iteration(model, optimizer, inputs, targets, contextlib.nullcontext)

    for _ in range(meta_every):  # warm-up: one cycle
        update()
    started = time.perf_counter()
    for _ in range(cycles * meta_every):
        update()
    seconds = (time.perf_counter() - started) / (cycles * meta_every)
    peak = speed.peak_mib()
    return {
        "seconds_per_update": seconds,
        "memory_mib": peak - baseline,
        "trainable": sum(p.numel() for p in trainable),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--cycles", type=int, default=3, help="timed meta_every cycles per configuration")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.rank, args.cycles)))
        return {}
    results = {}
    for config in CONFIGS:
        command = [sys.executable, __file__, "--child", config, "--rank", str(args.rank), "--cycles", str(args.cycles)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[config] = json.loads(output.strip().splitlines()[-1])
        print(config, results[config], flush=True)
    lines = [
        "| configuration | trainable parameters | s / update | of its plain step | memory (MiB) | of its plain run |",
        "|---|---|---|---|---|---|",
    ]
    for config, row in results.items():
        plain = results[config.split()[0] + " plain"]  # LoRA rows against plain LoRA
        lines.append(
            f"| {config} | {row['trainable']:,} of {row['parameters']:,} | {row['seconds_per_update']:.3f} | "
            f"{row['seconds_per_update'] / plain['seconds_per_update']:.2f}x | {row['memory_mib']:.0f} | "
            f"{row['memory_mib'] / plain['memory_mib']:.2f}x |"
        )
    print("\n".join(lines))
    if args.write:
        command = "python benchmarks/lora_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
        header = f"## LoRA against full fine-tuning, CPU (`{command}`)"
        write_section("lora_cost", [header, "", "ViT, 12 blocks at width 192, 64 px, batch 32, 2 cores.", "", *lines])
    return results


if __name__ == "__main__":
    main()
