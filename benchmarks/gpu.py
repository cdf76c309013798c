"""Images/s and peak memory on one GPU: MLNT's modes against a plain step, and an fp16 run through Accelerate.

One prepared script for a lent GPU machine, sized to finish in under 8 minutes on one GPU:

    python benchmarks/gpu.py --out gpu.json                # resnet50 at 224 px, ViT-B/16 at 224 px, bf16, batch 64
    python benchmarks/gpu.py --out gpu.json --write        # and the table into benchmarks/RESULTS.md
    python benchmarks/gpu.py --tiny                        # CPU, tiny models: what the test suite runs
    python benchmarks/gpu.py --load benchmarks/gpu/h200.json --write   # the table of a run made on another machine

Per model, every configuration runs in the same process (CUDA starts once): a plain
cross-entropy step; full MLNT at M = 10, second and first order; the affordable preset
(`MetaNoiseConfig.fast`); the fine-tuning recipe (`MetaNoiseConfig.finetune`); M = 10 with
``fast_params`` ``head`` and ``last_stage``; and M = 10 with ``sets_per_pass`` 1, 5 and 10
(the sets of one pass batched: one batched vector-Jacobian product, one ``vmap``); LoRA (PEFT, rank 16
on `noisy_meta.finetune.models.lora_targets`, the classifier trained in full) plain, with the
recipe and at M = 10. Each is
warmed up for a ``meta_every`` cycle (at least two iterations), then timed over whole cycles
for about ``--seconds`` seconds (at least 3 iterations); images/s is the batch times the iterations over
the time, peak memory ``torch.cuda.max_memory_allocated`` above what the model and its inputs
held before (not measured on CPU). A configuration that runs out of memory, or fails otherwise,
is reported with its error and the rest go on. Last, a short fp16 run through Accelerate
(``mixed_precision="fp16"``, its GradScaler on CUDA) with the
fine-tuning recipe: images/s, the scale it ended at, updates skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import speed  # noqa: E402
from results_file import write_section  # noqa: E402

#: Configurations: None is the plain step, else MetaNoiseConfig keyword arguments (a preset's name under "preset").
CONFIGS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "second order, M=10": {"num_synthetic": 10},
    "first order, M=10": {"num_synthetic": 10, "first_order": True},
    "preset fast": {"preset": "fast"},
    "preset finetune": {"preset": "finetune"},
    "head, M=10": {"num_synthetic": 10, "fast_params": "head"},
    "last_stage, M=10": {"num_synthetic": 10, "fast_params": "last_stage"},
    "sets_per_pass 1, M=10": {"num_synthetic": 10, "sets_per_pass": 1},
    "sets_per_pass 5, M=10": {"num_synthetic": 10, "sets_per_pass": 5},
    "sets_per_pass 10, M=10": {"num_synthetic": 10, "sets_per_pass": 10},
    "LoRA r=16, plain": {"lora": 16, "plain": True},
    "LoRA r=16, preset finetune": {"lora": 16, "preset": "finetune"},
    "LoRA r=16, M=10": {"lora": 16, "num_synthetic": 10},
}
FULL = {"models": [("resnet50", 224), ("vit_base_patch16_224", 224)], "batch_size": 64, "dtype": "bf16"}
#: The suite's CPU check: the same path at tiny sizes in fp32 (CPU bf16 autocast is slow and says nothing).
TINY = {"models": [("test_resnet", 32)], "batch_size": 12, "dtype": "fp32"}


def build(name: str, img_size: int, batch_size: int, device: str):
    """The model and a random batch, as `benchmarks/speed.py` builds them."""
    return speed.build(argparse.Namespace(model=name, img_size=img_size, batch_size=batch_size, device=device))


def meta_config(options: dict[str, Any]):
    from noisy_meta import MetaNoiseConfig

    options = dict(options)
    preset = options.pop("preset", None)
    schedule = {"ramp_start": 0, "ramp_end": 0, "seed": 0}  # the meta loss at full weight from the first step
    if preset == "fast":
        return MetaNoiseConfig.fast(**schedule, **options)
    if preset == "finetune":
        return MetaNoiseConfig.finetune(**schedule, **options)
    return MetaNoiseConfig(**schedule, **options)


def iteration(options: dict[str, Any] | None, model, inputs, targets, autocast):
    """A zero-argument callable running one training iteration; and the updates in one cycle."""
    import torch

    from noisy_meta import MetaNoiseWrapper

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    if options is None or options.get("plain"):
        return speed.plain_iteration(model, optimizer, inputs, targets, autocast), 1
    config = meta_config(options)
    wrapper = MetaNoiseWrapper(model, optimizer, config)

    def step() -> None:
        with autocast():
            wrapper.step(inputs, targets)

    return step, config.meta_every


def measure(name: str, img_size: int, options: dict[str, Any] | None, args: argparse.Namespace) -> dict[str, Any]:
    """images/s and peak MiB of one configuration (or the error that stopped it)."""
    import contextlib

    import torch

    device, gpu = args.device, args.device.startswith("cuda")
    dtype = {"bf16": torch.bfloat16, "fp32": None}[args.dtype]

    def autocast():
        return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    try:
        model, inputs, targets = build(name, img_size, args.batch_size, device)
        options = dict(options or {})
        if options.get("lora"):  # PEFT's LoRA on the timm-aware targets, the classifier trained in full
            from noisy_meta.finetune.models import add_lora

            model = add_lora(model, options.pop("lora"))
        run, cycle = iteration(options or None, model, inputs, targets, autocast)
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if gpu else 0
        started = time.perf_counter()
        warm_up = max(args.min_iterations - 1, cycle)  # autotuning, and a cycle's meta step
        for _ in range(warm_up):
            run()
        sync()
        per_iteration = (time.perf_counter() - started) / warm_up
        iterations = max(args.min_iterations, math.ceil(args.seconds / max(per_iteration, 1e-6)))
        iterations = math.ceil(iterations / cycle) * cycle  # whole meta_every cycles
        started = time.perf_counter()
        for _ in range(iterations):
            run()
        sync()
        seconds = time.perf_counter() - started
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if gpu else None
        return {"images_per_second": args.batch_size * iterations / seconds, "peak_mib": peak, "iterations": iterations}
    except torch.OutOfMemoryError as error:
        return {"error": f"out of memory: {str(error).splitlines()[0][:120]}"}
    except Exception as error:  # one configuration's failure is a row of the table, not the end of the lease
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"}
    finally:
        model = inputs = targets = run = None
        if gpu:
            torch.cuda.empty_cache()


def fp16_run(name: str, img_size: int, args: argparse.Namespace) -> dict[str, Any]:
    """A short run of the fine-tuning recipe through Accelerate with ``mixed_precision="fp16"``."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from noisy_meta import MetaNoiseWrapper

    gpu = args.device.startswith("cuda")
    accelerator = Accelerator(mixed_precision="fp16" if gpu else "no", cpu=not gpu)
    model, inputs, targets = build(name, img_size, args.batch_size, str(accelerator.device))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    wrapper = MetaNoiseWrapper(model, optimizer, meta_config({"preset": "finetune"}), accelerator=accelerator)
    steps = args.fp16_steps
    for _ in range(5):  # warm-up, one meta_every cycle
        wrapper.step(inputs, targets)
    if gpu:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        wrapper.step(inputs, targets)
    if gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    scaler = accelerator.scaler
    result = {
        "model": name,
        "mixed_precision": accelerator.mixed_precision,
        "images_per_second": args.batch_size * steps / seconds,
        "scale": scaler.get_scale() if scaler is not None else None,
        "updates": wrapper.num_updates,
        "skipped": wrapper.num_skipped,
    }
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return result


def table(results: dict[str, Any]) -> list[str]:
    """The results as Markdown: one row per configuration, images/s, its share of plain training's, peak memory."""
    lines = []
    for model in results["models"]:
        rows = model["configs"]
        plain = rows["plain"].get("images_per_second")
        lines += [
            "",
            f"{model['name']} at {model['img_size']} px, batch {results['batch_size']}, {results['dtype']}:",
            "",
            "| configuration | images/s | of plain | peak memory (MiB) |",
            "|---|---|---|---|",
        ]
        for config, row in rows.items():
            if "error" in row:
                lines.append(f"| {config} | {row['error']} | | |")
                continue
            speed = row["images_per_second"]
            share = f"{100 * speed / plain:.0f}%" if plain else "-"
            peak = f"{row['peak_mib']:.0f}" if row["peak_mib"] is not None else "-"
            lines.append(f"| {config} | {speed:.1f} | {share} | {peak} |")
    fp16 = results["fp16"]
    if "error" in fp16:
        return [*lines, "", f"fp16 through Accelerate ({fp16['model']}): failed, {fp16['error']}"]
    lines += [
        "",
        f"fp16 through Accelerate ({fp16['model']}, the fine-tuning recipe, mixed precision "
        f"{fp16['mixed_precision']}): {fp16['images_per_second']:.1f} images/s, GradScaler scale "
        f"{fp16['scale']}, {fp16['skipped']} of {fp16['updates'] + fp16['skipped']} updates skipped.",
    ]
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (the test suite's check)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per configuration")
    parser.add_argument("--fp16-steps", type=int, default=None, help="timed updates of the fp16 run")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS), metavar="CONFIG")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--load", type=Path, help="measure nothing: the table of this --out file (a lent GPU's run)")
    args = parser.parse_args(argv)
    if args.load:
        results = json.loads(args.load.read_text())
        command = results.get("command", "python benchmarks/gpu.py")
        write_table(
            results,
            f"`{command}` on the lent machine, table by `python benchmarks/gpu.py --load {args.load}`",
            write=args.write,
        )
        return results
    sizes = TINY if args.tiny else FULL
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.seconds = args.seconds if args.seconds is not None else (0.2 if args.tiny else 8.0)
    args.fp16_steps = args.fp16_steps or (5 if args.tiny else 50)
    args.min_iterations = 2 if args.tiny else 3
    args.batch_size, args.dtype = sizes["batch_size"], sizes["dtype"]
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: run it on a GPU machine, or --tiny on the CPU")
    started = time.perf_counter()
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "models": [],
    }
    if "plain" not in args.configs:
        args.configs = ["plain", *args.configs]  # every share is of the plain step's images/s
    for name, img_size in sizes["models"]:
        rows = {}
        for config in args.configs:
            rows[config] = measure(name, img_size, CONFIGS[config], args)
            print(f"{name} {config}: {rows[config]}", flush=True)
        results["models"].append({"name": name, "img_size": img_size, "configs": rows})
    try:
        results["fp16"] = fp16_run(*sizes["models"][0], args)
    except Exception as error:  # reported, after every measured row
        results["fp16"] = {"error": f"{type(error).__name__}: {error}"[:200], "model": sizes["models"][0][0]}
    results["seconds"] = time.perf_counter() - started
    results["command"] = "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    write_table(results, f"`{results['command']}`", write=args.write)
    return results


def write_table(results: dict[str, Any], made_by: str, write: bool = True) -> None:
    """Print the table, and with ``write`` put it into benchmarks/RESULTS.md."""
    lines = table(results)
    print("\n".join(lines))
    print(f"\n{results['seconds']:.0f} s in all on {results['device']}")
    if write:
        header = [f"## One GPU: {results['device']} ({made_by}, torch {results['torch']})"]
        write_section("gpu", [*header, *lines, "", f"{results['seconds']:.0f} s in all."])


if __name__ == "__main__":
    main()
