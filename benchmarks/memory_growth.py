"""Does memory grow over a long run? Resident memory of the wrapper over thousands of updates.

    python benchmarks/memory_growth.py                    # 3,000 updates, a small timm ResNet (9 min, 2 cores)
    python benchmarks/memory_growth.py --updates 20000 --preset fast

Runs `MetaNoiseWrapper.step` on a small timm ResNet (second order, M = 2, the meta step from
the first update; or the ``fast`` preset) with a fresh random batch each update, samples the
process's resident set size every ``--every`` updates after a warm-up, and fits a line through
the samples: the slope (KiB per 1,000 updates) is what a leak would show. glibc is asked to
return freed blocks of 64 KiB and more to the system (``MALLOC_MMAP_THRESHOLD_``, set before
the process starts), so freed tensors leave the resident set instead of staying in its heap.
The result is printed and written to benchmarks/RESULTS.md ("Memory over a long run").
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

from speed import FREED_MEMORY_VISIBLE, resident_mib


def measure(args: argparse.Namespace) -> dict[str, float]:
    import timm
    import torch

    from noisy_meta import MetaNoiseConfig, MetaNoiseWrapper

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, layers=(1, 1, 1, 1), channels=(16, 32, 64, 128))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    base = MetaNoiseConfig.fast() if args.preset == "fast" else MetaNoiseConfig(num_synthetic=2)
    wrapper = MetaNoiseWrapper(model, optimizer, base.with_overrides(ramp_start=0, ramp_end=0, seed=0, num_neighbors=5))
    generator = torch.Generator().manual_seed(0)
    samples: list[tuple[int, float]] = []
    started = time.perf_counter()
    for update in range(args.warmup + args.updates):
        inputs = torch.randn(args.batch_size, 3, 16, 16, generator=generator)
        targets = torch.randint(0, 10, (args.batch_size,), generator=generator)
        wrapper.step(inputs, targets)
        if update >= args.warmup and (update - args.warmup) % args.every == 0:
            samples.append((update - args.warmup, 1024 * resident_mib()))  # KiB
    seconds = time.perf_counter() - started
    xs, ys = [x for x, _ in samples], [y for _, y in samples]
    slope = statistics.linear_regression(xs, ys).slope * 1000  # KiB per 1,000 updates
    return {
        "slope_kib_per_1000": slope,
        "first_mib": ys[0] / 1024,
        "last_mib": ys[-1] / 1024,
        "max_mib": max(ys) / 1024,
        "min_mib": min(ys) / 1024,
        "seconds": seconds,
        "samples": len(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=3000, help="measured updates (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--every", type=int, default=100, help="sample the resident set every N updates")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--preset", choices=("full", "fast"), default="full")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.child:  # the allocator setting must be in place before the process starts
        env = {**os.environ, **FREED_MEMORY_VISIBLE}
        sys.exit(subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child"], env=env).returncode)
    import torch

    result = measure(args)
    line = (
        f"{args.updates} updates ({args.preset}, batch {args.batch_size}), {result['seconds']:.0f} s: resident "
        f"{result['first_mib']:.1f} -> {result['last_mib']:.1f} MiB (min {result['min_mib']:.1f}, max "
        f"{result['max_mib']:.1f}), slope {result['slope_kib_per_1000']:+.1f} KiB per 1,000 updates "
        f"({result['samples']} samples)"
    )
    print(line)
    if args.no_write:
        return
    from results_file import write_section

    command = "python benchmarks/memory_growth.py " + " ".join(a for a in sys.argv[1:] if a != "--child")
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs; Python {platform.python_version()}, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}"
    )
    write_section(
        f"memory growth: {args.preset}",
        [
            f"### Memory over a long run ({args.preset})",
            "",
            "```bash",
            command.strip(),
            "```",
            "",
            f"Machine: {machine}.",
            "",
            line,
        ],
    )


if __name__ == "__main__":
    main()
