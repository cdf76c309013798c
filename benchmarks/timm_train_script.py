"""MLNT inside timm's own ``train.py``, run for real: the README's diff applied to a checkout.

timm's ``train.py`` is not in timm's wheel: give a checkout of pytorch-image-models
(``--timm-checkout``, or ``NOISY_META_TIMM_CHECKOUT``). This script

1. writes scikit-learn's digits as an image folder (``train/``: 1,400 images, ``--noise-rate``
   of them symmetric-noisy, each in its noisy label's folder; ``validation/``: the other 397,
   clean), upscaled to 32 x 32;
2. applies the README's change (`patch_train_script`: the import, ``ClassificationTask`` ->
   ``MetaNoiseTask`` with ``loss_scaler=loss_scaler``, and one line after the scheduler,
   ``task.fit_run_length(num_epochs * updates_per_epoch)``) to a copy of the script, and refuses
   when the lines it changes are not found;
3. runs the unchanged and the patched script with the same flags for each setting asked
   (``--runs``: ``plain``, ``ema``, ``amp`` (bfloat16 on CPU), ``accum`` (``--grad-accum-steps 2``),
   ``resume`` (a run stopped after half its epochs and resumed from ``last.pth.tar``), each with
   timm's defaults apart from the data and the model, or ``--lr``/``--warmup-epochs`` given),
   and reports each run's last and best validation top-1 from its ``summary.csv``.

Example (the table in RESULTS.md):

    python benchmarks/timm_train_script.py --timm-checkout ~/pytorch-image-models --epochs 2 --runs plain
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]

#: The README's change to timm's train.py: (what the line says, what it becomes). Each must
#: match exactly once in the script.
IMPORT = "from timm.utils import NativeScaler\n"
TASK = "        task = ClassificationTask(\n"
TASK_VERBOSE = "            verbose=utils.is_primary(args),\n        )\n\n    model = task.get_trainable_module()"
SCHEDULER = "        updates_per_epoch=updates_per_epoch,\n    )\n    start_epoch = 0\n"
CHANGES = (
    (IMPORT, IMPORT + "from noisy_meta.timm import MetaNoiseTask\n"),
    (TASK, "        task = MetaNoiseTask(\n"),
    (
        TASK_VERBOSE,
        "            verbose=utils.is_primary(args),\n            loss_scaler=loss_scaler,\n        )\n\n"
        "    model = task.get_trainable_module()",
    ),
    (
        SCHEDULER,
        "        updates_per_epoch=updates_per_epoch,\n    )\n"
        "    task.fit_run_length(num_epochs * updates_per_epoch)\n    start_epoch = 0\n",
    ),
)
#: Flags every run shares: the data, a small model, CPU, no workers.
COMMON = [
    "--model",
    "resnet10t",
    "--num-classes",
    "10",
    "--img-size",
    "32",
    "-b",
    "64",
    "--device",
    "cpu",
    "--no-prefetcher",
    "-j",
    "0",
]
RUNS = {
    "plain": [],
    "ema": ["--model-ema", "--model-ema-decay", "0.99"],
    "amp": ["--amp", "--amp-dtype", "bfloat16"],
    "accum": ["--grad-accum-steps", "2"],
    "resume": [],
}


def patch_train_script(source: str, config: dict | None = None) -> str:
    """timm's ``train.py`` with the README's change; ValueError when a line to change is not there once.

    ``config``: for exploration only (not the README's change), MetaNoiseConfig fields the task
    is built with instead of its defaults.
    """
    for before, after in CHANGES:
        count = source.count(before)
        if count != 1:
            raise ValueError(f"train.py: expected the line(s) {before.strip()[:60]!r} once, found {count}")
        source = source.replace(before, after)
    if config is not None:
        task_end = "            loss_scaler=loss_scaler,\n        )\n\n    model = task.get_trainable_module()"
        given = f"            config=__import__('noisy_meta').MetaNoiseConfig(**{config!r}),\n"
        source = source.replace(task_end, task_end.replace("        )\n", given + "        )\n", 1))
    return source


def write_digits(root: Path, noise_rate: float, seed: int = 0) -> dict[str, float]:
    """Digits as ``root/train/<label>/*.png`` (noisy labels) and ``root/validation/<label>/*.png``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    train, validation = order[:1400], order[1400:]
    labels = digits.target.copy()
    noisy = rng.random(len(train)) < noise_rate
    for position in np.flatnonzero(noisy):  # symmetric: another class, uniformly
        index = train[position]
        labels[index] = (labels[index] + rng.integers(1, 10)) % 10
    for split, indices in (("train", train), ("validation", validation)):
        for index in indices:
            label = labels[index] if split == "train" else digits.target[index]
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
            Image.fromarray(pixels).convert("RGB").resize((32, 32), Image.BILINEAR).save(folder / f"{index}.png")
    return {"train": len(train), "validation": len(validation), "realised_noise": float(noisy.mean())}


def run_script(script: Path, data: Path, output: Path, name: str, flags: list[str], timeout: float) -> dict:
    """One run of ``script``; the validation top-1 of its last and best epoch from ``summary.csv``."""
    command = [sys.executable, str(script), "--data-dir", str(data), *COMMON, "--output", str(output)]
    command += ["--experiment", name, *flags]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=script.parent)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    with open(output / name / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    top1 = [float(row["eval_top1"]) for row in rows]
    return {
        "last_top1": top1[-1],
        "best_top1": max(top1),
        "train_loss": [round(float(row["train_loss"]), 3) for row in rows],
        "seconds": round(seconds, 1),
    }


def stop_after(
    script: Path, data: Path, output: Path, name: str, flags: list[str], epochs: int, timeout: float
) -> Path:
    """Start a run and stop it (SIGTERM) once the checkpoint of its first ``epochs`` epochs is saved."""
    command = [sys.executable, str(script), "--data-dir", str(data), *COMMON, "--output", str(output)]
    process = subprocess.Popen(
        [*command, "--experiment", name, *flags],
        cwd=script.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = output / name / f"checkpoint-{epochs - 1}.pth.tar"  # timm numbers epochs from 0
    deadline = time.monotonic() + timeout
    while not saved.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    # timm's CheckpointSaver writes last.pth.tar first and links checkpoint-<epoch> to it.
    process.terminate()
    process.wait()
    if not saved.exists():
        raise RuntimeError(f"{name}: no checkpoint after epoch {epochs}")
    return output / name / "last.pth.tar"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timm-checkout", default=os.environ.get("NOISY_META_TIMM_CHECKOUT"))
    parser.add_argument("--work-dir", default="/tmp/noisy-meta-timm-train")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--noise-rate", type=float, default=0.4)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags for both scripts")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--task-config", default=None, help="exploration: MetaNoiseConfig fields as JSON")
    parser.add_argument("--tag", default="", help="appended to the run names")
    parser.add_argument("--skip-ce", action="store_true", help="run the patched script only")
    args = parser.parse_args(argv)
    if not args.timm_checkout:
        parser.error("give --timm-checkout (a pytorch-image-models checkout) or set NOISY_META_TIMM_CHECKOUT")
    work = Path(args.work_dir)
    data = work / "digits"
    if not (data / "train").exists():
        print("data:", write_digits(data, args.noise_rate))
    original = Path(args.timm_checkout) / "train.py"
    patched = original.with_name("train_mlnt.py")
    config = json.loads(args.task_config) if args.task_config else None
    patched.write_text(patch_train_script(original.read_text(), config))
    results = {}
    for run in args.runs:
        flags = ["--epochs", str(args.epochs), *RUNS[run], *args.extra]
        scripts = (("ce", original), ("mlnt", patched))
        for which, script in scripts[1:] if args.skip_ce else scripts:
            name = f"{run}-{which}" + (f"-{args.tag}" if args.tag else "")
            output = work / "output"
            for old in (output / name, output / f"{name}-first"):
                if old.exists():
                    subprocess.run(["rm", "-rf", str(old)], check=True)
            if run == "resume":  # stopped once half the epochs are saved, then resumed from last.pth.tar
                first = stop_after(script, data, output, name + "-first", flags, args.epochs // 2, args.timeout)
                results[name] = run_script(script, data, output, name, [*flags, "--resume", str(first)], args.timeout)
            else:
                results[name] = run_script(script, data, output, name, flags, args.timeout)
            print(name, results[name], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
