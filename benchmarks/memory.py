"""Peak memory of the meta step against M: per-set accumulation vs one summed meta loss.

`MetaNoiseWrapper.meta_backward` accumulates the meta-gradient one synthetic set at a time;
`MetaNoiseWrapper.meta_loss` builds all M graphs for one backward, as the reference code does.
Each configuration runs in its own process; the figure is the growth of the process's peak
resident memory over its resident memory just before the measured iteration (CPU, Linux).

    python benchmarks/memory.py [--model resnet18] [--img-size 64] [--batch-size 32] [--inner-step relative]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

MODES = ("meta_backward", "meta_loss")
NUM_SYNTHETIC = (1, 5, 10)


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def measure(model_name: str, img_size: int, batch_size: int, mode: str, num_synthetic: int, inner_step: str) -> float:
    import timm
    import torch
    import torch.nn.functional as F

    from noisy_meta import MetaNoiseWrapper

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    wrapper = MetaNoiseWrapper(
        model, optimizer, num_synthetic=num_synthetic, ramp_start=0, ramp_end=0, seed=0, inner_step=inner_step
    )
    inputs = torch.randn(batch_size, 3, img_size, img_size)
    targets = torch.randint(0, 10, (batch_size,))

    def iteration():
        optimizer.zero_grad(set_to_none=True)
        outputs = model(inputs)
        loss = F.cross_entropy(outputs, targets)
        if mode == "meta_backward":
            wrapper.meta_backward(inputs, targets, outputs)
            loss.backward()
        else:
            (loss + wrapper.meta_loss(inputs, targets, outputs)).backward()

    iteration()  # warm-up: allocator pools, gradients
    before = resident_mib()
    iteration()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--inner-step", default="sgd", help="MetaNoiseConfig.inner_step")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "M"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, m = args.child
        print(json.dumps(measure(args.model, args.img_size, args.batch_size, mode, int(m), args.inner_step)))
        return

    # Large blocks straight from mmap, so freed tensors leave the resident set at once and the
    # peak resident size follows the live tensors rather than the allocator's caching.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    size = f"{args.img_size}x{args.img_size}"
    print(f"{args.model} {size}, batch {args.batch_size}, second order, {args.inner_step} step, CPU")
    print(f"{'M':>3} " + " ".join(f"{mode + ' (MiB)':>20}" for mode in MODES))
    for m in NUM_SYNTHETIC:
        row = []
        for mode in MODES:
            command = [
                sys.executable,
                __file__,
                "--model",
                args.model,
                "--img-size",
                str(args.img_size),
                "--batch-size",
                str(args.batch_size),
                "--inner-step",
                args.inner_step,
                "--child",
                mode,
                str(m),
            ]
            output = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
            row.append(json.loads(output.strip().splitlines()[-1]))
        print(f"{m:>3} " + " ".join(f"{value:20.0f}" for value in row), flush=True)


if __name__ == "__main__":
    main()
