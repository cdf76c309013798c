"""Where the time of one `MetaNoiseWrapper.step` goes: operators, and the package's own Python.

    python benchmarks/profile_step.py --model resnet18 --img-size 32 --batch-size 32 --num-synthetic 10

Prints (1) the operators with the largest self CPU time (``torch.profiler``, one step after
a warm-up) and (2) from ``cProfile``, the time spent in the Python code of ``noisy_meta``
itself (its functions' own time, without the PyTorch calls they make) against the step's
wall time: the per-step Python overhead of the package.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

import timm
import torch
from torch.profiler import ProfilerActivity, profile

from noisy_meta import MetaNoiseWrapper

PACKAGE = str(Path(__file__).resolve().parents[1] / "noisy_meta")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-synthetic", type=int, default=10)
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--fast-params", default="all")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10)
    inputs = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    targets = torch.randint(0, 10, (args.batch_size,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    wrapper = MetaNoiseWrapper(
        model,
        optimizer,
        num_synthetic=args.num_synthetic,
        first_order=args.first_order,
        fast_params=args.fast_params,
        ramp_start=0,
        ramp_end=0,
        seed=0,
    )
    wrapper.step(inputs, targets)  # warm-up

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wrapper.step(inputs, targets)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))

    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    wrapper.step(inputs, targets)
    profiler.disable()
    wall = time.perf_counter() - started
    stats = pstats.Stats(profiler).stats
    own = sum(tottime for (filename, _, _), (_, _, tottime, _, _) in stats.items() if filename.startswith(PACKAGE))
    print(
        f"step wall time {wall:.3f} s (under cProfile); noisy_meta's own Python {own * 1e3:.1f} ms = {own / wall:.2%}"
    )


if __name__ == "__main__":
    main()
