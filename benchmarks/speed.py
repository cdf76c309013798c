"""Seconds per iteration and peak memory of MLNT against a plain step, the reference and a floor.

Every configuration is timed in its own process: one warm-up iteration, then the median of
``--repeats`` timed iterations. Its peak memory is measured in another process: the growth of
the process's peak resident set over one iteration after the warm-up (CPU, Linux), with
glibc told to serve blocks of 64 KiB and more straight from mmap so that freed tensors leave
the resident set. That setting makes every large allocation a fresh mapping and slowed
iterations down about 3x when it was on during timing, hence the two processes. Ratios are
to the plain cross-entropy step measured in the same run.

The floor is what one sequential MLNT iteration cannot go below, from the model's own passes
timed in isolation: forward F, no-grad forward Fn (mentor), CE backward B, inner gradient with
``create_graph`` Bc, and the backward through a fast forward and its inner gradient D:
second order ``F + Fn + B + M (Bc + F + D)``, first order ``F + Fn + B + M (2B + F)``.

    python benchmarks/speed.py --model resnet18 --img-size 32 --batch-size 32
    python benchmarks/speed.py --model resnet50 --img-size 64
    python benchmarks/speed.py --model vit_small_patch16_224 --img-size 64
    python benchmarks/speed.py --model resnet50 --img-size 224 --device cuda --amp bf16   # a GPU
    python benchmarks/speed.py --model smallcnn --img-size 14 --batch-size 128 \
        --configs plain second_order_M5 second_order_M5_last_stage second_order_M5_head second_order_M5_every4
        # the accuracy benchmark's model, batch and M: the cost side of its cheaper-modes table

    python benchmarks/speed.py --configs plain fast second_order_M1_every4_sub50 --section 'affordable modes'
        # the affordable preset and its neighbours, in a RESULTS.md section of their own

Configuration names: ``plain``; ``fast`` (``MetaNoiseConfig.fast()``); ``<order>_M<m>`` with
order ``first_order``, ``second_order`` or ``reference`` and any of the suffixes
``_last_stage`` / ``_head`` (``fast_params``), ``_every<N>`` (``meta_every``), ``_sub<P>``
(``meta_batch_fraction`` P%), ``_batched`` (``sets_per_pass`` = M) and ``_pass<K>``
(``sets_per_pass`` = K). A configuration with ``meta_every`` N is timed
over whole cycles of N updates (their mean), the plain step over at least 20 iterations.

``_batched`` configurations run all M sets in one pass (``sets_per_pass=M``: one batched
vector-Jacobian product for the inner gradients, one ``vmap`` for the fast forwards); the
others one set at a time. On a GPU, peak memory is ``torch.cuda.max_memory_allocated``.

The table is printed and written into benchmarks/RESULTS.md (one section per model/size/batch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("RESULTS.md")
NUM_SYNTHETIC = (1, 5, 10)
CONFIGS = (
    ["plain"]
    + [f"{order}_M{m}" for order in ("first_order", "second_order") for m in NUM_SYNTHETIC]
    + ["second_order_M10_last_stage", "second_order_M10_head", "first_order_M10_head", "second_order_M10_every4"]
    + ["first_order_M10_batched", "second_order_M10_batched"]
    + [f"reference_M{m}" for m in NUM_SYNTHETIC]
)


#: glibc serves blocks of 64 KiB and more straight from mmap, so freed tensors leave the resident set.
FREED_MEMORY_VISIBLE = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(args: argparse.Namespace):
    import timm
    import torch

    torch.manual_seed(0)
    if args.model == "smallcnn":  # the accuracy benchmark's model (1 channel)
        from accuracy import SmallCNN

        model, channels = SmallCNN(img_size=args.img_size).to(args.device), 1
    else:
        kwargs = {"img_size": args.img_size} if "vit" in args.model else {}
        model, channels = timm.create_model(args.model, num_classes=10, **kwargs).to(args.device), 3
    inputs = torch.randn(args.batch_size, channels, args.img_size, args.img_size, device=args.device)
    targets = torch.randint(0, 10, (args.batch_size,), device=args.device)
    return model, inputs, targets


def autocast(args: argparse.Namespace):
    """bf16 autocast around a whole iteration with ``--amp bf16``, else nothing."""
    import contextlib

    import torch

    if args.amp == "bf16":
        return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def plain_iteration(model, optimizer, inputs, targets, autocast):
    """A zero-argument callable: one cross-entropy step of ``model`` with its forward under ``autocast()``, the
    plain step every benchmark measures MLNT against."""
    import torch.nn.functional as F

    def plain() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()

    return plain


def synchronize(args: argparse.Namespace) -> None:
    import torch

    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()


def iteration_for(config: str, args: argparse.Namespace):
    """A zero-argument callable running one iteration of ``config``."""
    import copy

    import torch

    from noisy_meta import MetaNoiseConfig, MetaNoiseWrapper

    model, inputs, targets = build(args)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if config == "plain":
        return plain_iteration(model, optimizer, inputs, targets, lambda: autocast(args))
    if config == "fast":
        wrapper = MetaNoiseWrapper(model, optimizer, MetaNoiseConfig.fast(ramp_start=0, ramp_end=0, seed=0))
        return lambda: wrapper_step(wrapper, inputs, targets, args)
    kind, m, options = parse_config(config)
    if kind == "reference":
        from reference_mlnt import ReferenceMLNT

        reference = ReferenceMLNT(model, optimizer, features=copy.deepcopy(model), num_synthetic=m)

        def reference_step():
            with autocast(args):
                reference.step(inputs, targets)

        return reference_step
    settings = dict(num_synthetic=m, first_order=kind == "first_order", ramp_start=0, ramp_end=0, seed=0)
    wrapper = MetaNoiseWrapper(model, optimizer, **settings, **options)
    return lambda: wrapper_step(wrapper, inputs, targets, args)


def wrapper_step(wrapper, inputs, targets, args: argparse.Namespace) -> None:
    with autocast(args):
        wrapper.step(inputs, targets)


#: Timed iterations of the plain step, at least (it divides every other configuration's time).
PLAIN_REPEATS = 20
#: The suffixes a configuration name may end with (see `parse_config`).
SUFFIX = r"last_stage|head|batched|every\d+|sub\d+|pass\d+"


def parse_config(config: str) -> tuple[str, int, dict[str, Any]]:
    """``(kind, M, MetaNoiseConfig overrides)`` of a configuration name such as ``second_order_M1_every4_sub50``.

    Suffixes: ``_last_stage`` / ``_head`` (``fast_params``), ``_every<N>`` (``meta_every``),
    ``_sub<P>`` (``meta_batch_fraction`` P%), ``_batched`` (``sets_per_pass=M``), ``_pass<K>``
    (``sets_per_pass=K``).
    """
    match = re.fullmatch(rf"(first_order|second_order|reference)_M(\d+)((?:_(?:{SUFFIX}))*)", config)
    if match is None:
        raise SystemExit(f"unknown configuration {config!r}; known: {', '.join(CONFIGS)} (any M, any suffixes)")
    kind, m, options = match.group(1), int(match.group(2)), {}
    for suffix in re.findall(SUFFIX, match.group(3)):
        if suffix in ("last_stage", "head"):
            options["fast_params"] = suffix
        elif suffix == "batched":
            options["sets_per_pass"] = m
        elif suffix.startswith("pass"):
            options["sets_per_pass"] = int(suffix[len("pass") :])
        elif suffix.startswith("every"):
            options["meta_every"] = int(suffix[len("every") :])
        else:
            options["meta_batch_fraction"] = int(suffix[len("sub") :]) / 100
    return kind, m, options


def cycle(config: str) -> int:
    """Updates in one ``meta_every`` cycle of ``config`` (timed together, then averaged)."""
    if config == "fast":
        from noisy_meta.config import FAST_PRESET

        return FAST_PRESET["meta_every"]
    if config == "plain" or config.startswith("reference"):
        return 1
    return parse_config(config)[2].get("meta_every", 1)


def time_config(config: str, args: argparse.Namespace) -> dict[str, float]:
    """``seconds`` (``--measure time``) or ``peak_mib`` (``--measure memory``) of ``config``."""
    import torch

    run = iteration_for(config, args)
    run()  # warm-up
    updates = cycle(config)
    repeats = updates if args.measure == "memory" else updates * args.repeats  # whole meta_every cycles
    if config == "plain" and args.measure == "time":
        repeats = max(repeats, PLAIN_REPEATS)  # every ratio's denominator: cheap, and noisy over 3 samples
    gpu = torch.device(args.device).type == "cuda"
    synchronize(args)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = resident_mib()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        synchronize(args)
        times.append(time.perf_counter() - started)
    if args.measure == "memory":
        peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else peak_mib()
        return {"peak_mib": peak - before}
    return {"seconds": statistics.fmean(times) if updates > 1 else statistics.median(times)}


def time_floor_parts(args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of F, Fn, B, Bc and D (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    from noisy_meta import make_twice_differentiable

    model, inputs, targets = build(args)
    make_twice_differentiable(model)
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    buffers = {name: b.clone() for name, b in model.named_buffers()}

    def timed(function, prepare=lambda: None) -> float:
        samples = []
        for index in range(args.repeats + 1):
            with autocast(args):
                state = prepare()
                synchronize(args)
                started = time.perf_counter()
                function(state)
                synchronize(args)
            if index:  # the first is a warm-up
                samples.append(time.perf_counter() - started)
        return statistics.median(samples)

    def forward(_=None):
        return model(inputs)

    def with_inner_graph():
        outputs = model(inputs)
        grads = torch.autograd.grad(F.cross_entropy(outputs, targets), params, create_graph=True)
        fast = {name: p - 0.1 * g for name, p, g in zip(names, params, grads)}
        return F.cross_entropy(functional_call(model, {**fast, **buffers}, (inputs,)), targets)

    parts = {
        "F": timed(forward),
        "Fn": timed(lambda _: torch.no_grad()(forward)()),
        "B": timed(lambda outputs: torch.autograd.grad(F.cross_entropy(outputs, targets), params), forward),
        "Bc": timed(
            lambda outputs: torch.autograd.grad(F.cross_entropy(outputs, targets), params, create_graph=True), forward
        ),
        "D": timed(lambda loss: torch.autograd.grad(loss, params), with_inner_graph),
    }
    return parts


def floor_seconds(parts: dict[str, float], config: str) -> float | None:
    match = re.fullmatch(r"(first_order|second_order)_M(\d+)", config)
    if match is None:
        return None
    m = int(match.group(2))
    base = parts["F"] + parts["Fn"] + parts["B"]
    if match.group(1) == "second_order":
        return base + m * (parts["Bc"] + parts["F"] + parts["D"])
    return base + m * (2 * parts["B"] + parts["F"])


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    result = time_floor_parts(args) if args.child == "floor" else time_config(args.child, args)
    print(json.dumps(result))


def run_child(name: str, args: argparse.Namespace, measure: str = "time") -> dict[str, float]:
    command = [sys.executable, __file__, *command_options(args), "--child", name, "--measure", measure]
    env = {**os.environ, **FREED_MEMORY_VISIBLE} if measure == "memory" else dict(os.environ)
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def command_options(args: argparse.Namespace) -> list[str]:
    """The options that define a measurement (passed on to every child process)."""
    return [
        "--model",
        args.model,
        "--img-size",
        str(args.img_size),
        "--batch-size",
        str(args.batch_size),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
        "--amp",
        args.amp,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations per configuration (median)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none", help="bf16 autocast around each iteration")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), help="a subset of the configurations")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument(
        "--section", help="write the rows to their own RESULTS.md section, titled '<model, size, batch>: SECTION'"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=("time", "memory"), default="time", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import torch

    if torch.device(args.device).type == "cuda":
        where = f"{torch.cuda.get_device_name()}"
    else:
        where = f"CPU, {torch.get_num_threads()} threads"
    precision = ", bf16 autocast" if args.amp == "bf16" else ""
    title = f"{args.model} {args.img_size}x{args.img_size}, batch {args.batch_size}, {where}{precision}"
    if args.section:
        title += f": {args.section}"
    print(title, flush=True)
    parts = run_child("floor", args)
    print("floor parts (s): " + ", ".join(f"{k} {v:.4f}" for k, v in parts.items()), flush=True)
    rows, unit = [], None
    width = max(30, *(len(config) for config in args.configs))
    header = f"{'configuration':<{width}} " + " ".join(
        f"{name:>{size}}"
        for name, size in (("s/iter", 8), ("img/s", 8), ("x plain", 8), ("peak MiB", 9), ("floor s", 8), ("x floor", 8))
    )
    print(header, flush=True)
    for config in args.configs:
        try:
            result = {**run_child(config, args), **run_child(config, args, "memory")}
        except subprocess.CalledProcessError as error:  # report it and go on with the others
            last_line = (error.stderr or "").strip().splitlines()[-1:] or ["no output"]
            rows.append(f"{config:<{width}} failed: {last_line[0][:120]}")
            print(rows[-1], flush=True)
            continue
        unit = result["seconds"] if config == "plain" else unit
        floor = floor_seconds(parts, config)
        row = (
            f"{config:<{width}} {result['seconds']:8.3f} {args.batch_size / result['seconds']:8.1f} "
            f"{result['seconds'] / unit if unit else float('nan'):8.2f} "
            f"{result['peak_mib']:9.0f} {floor if floor else float('nan'):8.3f} "
            f"{result['seconds'] / floor if floor else float('nan'):8.2f}"
        )
        rows.append(row)
        print(row, flush=True)
    if not args.no_write:
        command = "python benchmarks/speed.py " + " ".join(command_options(args))
        if args.configs != list(CONFIGS):
            command += " --configs " + " ".join(args.configs)
        if args.section:
            command += f" --section {shlex.quote(args.section)}"
        write_section(title, command, parts, header, rows)


def write_section(title: str, command: str, parts: dict[str, float], header: str, rows: list[str]) -> None:
    """Replace (or add) this model's section of the performance part of RESULTS.md."""
    import timm
    import torch

    key = title
    start, end = f"<!-- speed: {key} -->", f"<!-- /speed: {key} -->"
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs; Python {platform.python_version()}, "
        f"torch {torch.__version__}, timm {timm.__version__}; {time.strftime('%Y-%m-%d')}"
    )
    body = "\n".join(
        [
            start,
            f"### {title}",
            "",
            "```bash",
            command,
            "```",
            "",
            f"Machine: {machine}.",
            "",
            "```text",
            "floor parts (s): " + ", ".join(f"{k} {v:.4f}" for k, v in parts.items()),
            header,
            *rows,
            "```",
            end,
        ]
    )
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if "## Performance" not in text:
        text = text.rstrip("\n") + "\n\n## Performance\n\nWritten by `benchmarks/speed.py`.\n"
    if start in text:
        text = text[: text.index(start)] + body + text[text.index(end) + len(end) :]
    else:  # after the last speed section, or at the top of the performance part
        anchor = text.rfind("<!-- /speed: ")
        if anchor >= 0:
            at = text.index("-->", anchor) + len("-->")
        else:
            at = text.index("\n", text.index("Written by `benchmarks/speed.py`."))
        text = text[:at] + "\n\n" + body + text[at:]
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
