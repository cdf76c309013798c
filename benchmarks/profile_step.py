"""Where the time of one `MetaNoiseWrapper.step` goes: operators, the package's own Python, and on a GPU how busy it is.

    python benchmarks/profile_step.py --model resnet18 --img-size 32 --batch-size 32 --num-synthetic 10
    python benchmarks/profile_step.py --device cuda --amp bf16 --preset finetune \
        --model resnet50 --img-size 224 --batch-size 64

Prints (1) the operators with the largest self time (``torch.profiler``, one step after a
warm-up; on CUDA sorted by GPU time), (2) from ``cProfile``, the time spent in the Python code
of ``noisy_meta`` itself (its functions' own time, without the PyTorch calls they make)
against the step's wall time, and (3) the wall time of a plain cross-entropy step and of the
meta step, each synchronised, with (on CUDA) the GPU's kernel time inside the meta step: a
step whose kernels fill a small share of its wall time waits on the host (Python, launches,
synchronisations), not on the GPU. ``--preset`` profiles a preset's meta step (``meta_every``
set to 1, so the profiled step is the one that runs the meta loss).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from noisy_meta import MetaNoiseConfig, MetaNoiseWrapper

sys.path.insert(0, str(Path(__file__).parent))

import speed  # noqa: E402

PACKAGE = str(Path(__file__).resolve().parents[1] / "noisy_meta")


def timed(run, args: argparse.Namespace, repeats: int = 3) -> float:
    """Mean synchronised wall seconds of ``run()`` over ``repeats`` calls."""
    speed.synchronize(args)
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    speed.synchronize(args)
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-synthetic", type=int, default=10)
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--fast-params", default="all")
    parser.add_argument("--preset", choices=["fast", "finetune"], help="a preset's meta step instead of the flags")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")

    model, inputs, targets = speed.build(args)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    schedule = {"ramp_start": 0, "ramp_end": 0, "seed": 0}
    if args.preset:
        config = getattr(MetaNoiseConfig, args.preset)(meta_every=1, **schedule)
    else:
        config = MetaNoiseConfig(
            num_synthetic=args.num_synthetic, first_order=args.first_order, fast_params=args.fast_params, **schedule
        )
    wrapper = MetaNoiseWrapper(model, optimizer, config)

    def meta_step() -> None:
        speed.wrapper_step(wrapper, inputs, targets, args)

    plain_step = speed.plain_iteration(model, optimizer, inputs, targets, lambda: speed.autocast(args))

    for _ in range(2):  # warm-up: autotuning, the caching allocator
        meta_step()
        plain_step()

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        meta_step()
        speed.synchronize(args)
    events = prof.key_averages()
    print(events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=args.top))

    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    meta_step()
    speed.synchronize(args)
    profiler.disable()
    wall = time.perf_counter() - started
    stats = pstats.Stats(profiler).stats
    own = sum(tottime for (filename, _, _), (_, _, tottime, _, _) in stats.items() if filename.startswith(PACKAGE))
    print(
        f"step wall time {wall:.3f} s (under cProfile); noisy_meta's own Python {own * 1e3:.1f} ms = {own / wall:.2%}"
    )

    plain, meta = timed(plain_step, args), timed(meta_step, args)
    line = f"plain step {plain * 1e3:.1f} ms, meta step {meta * 1e3:.1f} ms = {meta / plain:.1f} plain steps"
    if cuda:
        kernels = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6  # us -> s
        line += f"; GPU kernel time in the profiled meta step {kernels * 1e3:.1f} ms = {kernels / meta:.0%} of its wall"
    print(line)


if __name__ == "__main__":
    main()
