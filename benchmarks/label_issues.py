"""How well the run's label-error report finds the wrong labels, signal by signal, and what collecting it costs.

    python benchmarks/label_issues.py [--epochs 8] [--write]
    python benchmarks/label_issues.py --finetune [--write]    # the fine-tuning benchmark's pretrained ResNet

Runs the command line's default embedded job (a small timm ResNet on 4,000 MNIST digits, the
README's first command) twice, at symmetric 40% noise and at none, with ``--export-pred-probs``,
and scores against the clean labels each way of flagging a training label:

- ``AUM < 0``: the report's flag (``label_issues.csv``), the mean margin on the given label
  over training (`noisy_meta.AreaUnderMargin`);
- ``mentor disagrees``: the best mentor's predicted class is not the given one (``pred_probs.npz``);
- ``both``: flagged by both; ``either``: by one or the other;
- top-100 precision of each ranking (AUM ascending; the mentor's probability of the given
  label ascending; their mean rank).

``--finetune``: the fine-tuning benchmark's pretrained ResNet (`finetune_accuracy.py`: digits 5-9
in another rendering, 1,596 training images, the long regime's 25 epochs, seed 0) trained with the
recipe (`MetaNoiseConfig.finetune`, no cleaning before training, so every image is ranked) at
symmetric 40% noise and at none, with a third signal, the neighbour vote over the pretrained
features before training (`noisy_meta.detect_label_noise`, per-class thresholds): each signal
alone, two of three, and the top-100 of the mean rank of the three.

Cost: the report's own work (the margins of every training batch, `AreaUnderMargin.update`),
timed on the run's batch shapes, against the run's training time from ``metrics.jsonl``.
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

sys.path.insert(0, str(Path(__file__).parent))

from results_file import write_section  # noqa: E402

from noisy_meta.finetune.settings import EMBEDDED_DEFAULTS  # noqa: E402

ROOT = Path(__file__).parents[1]
OUT = ROOT / "benchmarks" / "label_issues"


def run(noise_rate: float, epochs: int, reuse: bool = False) -> Path:
    output = OUT / f"sym{int(100 * noise_rate)}"
    if reuse and (output / "label_issues.csv").exists():
        return output
    noise = ["--noise", "symmetric", "--noise-rate", str(noise_rate)] if noise_rate else ["--noise", "none"]
    command = [sys.executable, str(ROOT / "examples" / "finetune.py"), "--output-dir", str(output), "--overwrite"]
    command += [*noise, "--epochs", str(epochs), "--export-pred-probs", "--seed", "0"]
    subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return output


def scores(output: Path) -> dict[str, dict[str, float]]:
    with open(output / "label_issues.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    index = np.array([int(r["index"]) for r in rows])
    given = np.array([int(r["given_label"]) for r in rows])
    clean = [r.get("clean_label", "") for r in rows]  # none known without injected noise: the labels as given
    wrong = np.array([c != "" and int(c) != g for c, g in zip(clean, given)])
    aum = np.array([float(r["aum"]) for r in rows])
    saved = np.load(output / "pred_probs.npz")
    row_of = {int(i): k for k, i in enumerate(saved["index"])}
    probs = saved["pred_probs"][[row_of[int(i)] for i in index]]
    given_prob = probs[np.arange(len(given)), given]
    mentor = probs.argmax(axis=1) != given
    suspicion = {
        "AUM < 0": -aum,
        "mentor disagrees": -given_prob,
        "both": -(np.argsort(np.argsort(aum)) + np.argsort(np.argsort(given_prob))) / 2,
    }
    flags = {"AUM < 0": aum < 0, "mentor disagrees": mentor, "both": (aum < 0) & mentor, "either": (aum < 0) | mentor}
    return {name: flag_scores(wrong, flagged, suspicion.get(name)) for name, flagged in flags.items()}


def collection_cost(output: Path) -> dict[str, float]:
    """Seconds `AreaUnderMargin.update` takes over the run's batches, against the run's training seconds."""
    import torch

    from noisy_meta import AreaUnderMargin

    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    samples, epochs = records[0]["train_samples"], len(records)
    batch, classes = 64, 10
    aum = AreaUnderMargin(samples)
    logits, labels = torch.randn(batch, classes), torch.randint(0, classes, (batch,))
    batches = epochs * -(-samples // batch)
    started = time.perf_counter()
    for step in range(batches):
        aum.update(torch.arange(step * batch, (step + 1) * batch) % samples, logits, labels)
    seconds = time.perf_counter() - started
    training = sum(record["seconds"] for record in records)
    return {"seconds": seconds, "training_seconds": training, "share": seconds / training}


def flag_scores(wrong: np.ndarray, flagged: np.ndarray, suspicion: np.ndarray | None) -> dict[str, float]:
    """Share flagged, precision, recall, F1 (`DetectionReport.measure`; NaN where undefined), and the top-100
    precision of ``suspicion`` (higher: more suspect)."""
    from noisy_meta.labels.cleaning import DetectionReport

    report = DetectionReport.measure(flagged, wrong)
    top = wrong[np.argsort(-suspicion, kind="stable")[:100]].mean() if suspicion is not None else None
    figures = {"precision": report.precision, "recall": report.recall, "f1": report.f1, "top100": top}
    figures = {name: float("nan") if value is None else float(value) for name, value in figures.items()}
    return {"flagged": float(flagged.mean()), **figures}


def finetune_signals(setting: str) -> dict[str, dict[str, float]]:
    """The fine-tuning benchmark's ResNet, the recipe for the long regime: the three signals and their combinations."""
    import torch
    from finetune_accuracy import COMMON, DETECTION_K, REGIMES
    from finetune_backbones import PRETRAIN, batches, cosine, load_pretrained, pretrain
    from finetune_data import TARGET_CLASSES, target

    from noisy_meta import AreaUnderMargin, MetaNoiseConfig, MetaNoiseWrapper
    from noisy_meta.config import run_length_schedule
    from noisy_meta.labels.detection import detect_label_noise, extract_features

    torch.manual_seed(0)
    data = target(setting, 0)
    model = load_pretrained(
        pretrain("resnet", PRETRAIN["resnet"], ROOT / "benchmarks" / "finetune" / "pretrained"), "resnet", 5
    )
    labels, clean = data.train_y.numpy(), data.train_clean.numpy()
    vote = detect_label_noise(
        extract_features(model, data.train_x),
        labels,
        num_classes=len(TARGET_CLASSES),
        k=DETECTION_K,
        threshold="per_class",
    )
    epochs, batch_size, lr = REGIMES["long"], 64, 0.02
    total = epochs * (len(labels) // batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = cosine(optimizer, total)
    config = MetaNoiseConfig.finetune(**run_length_schedule(total), num_neighbors=COMMON["num_neighbors"], seed=0)
    wrapper = MetaNoiseWrapper(model, optimizer, config)
    aum = AreaUnderMargin(len(labels))
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in batches(len(labels), batch_size, generator):
            wrapper.step(data.train_x[batch], data.train_y[batch])
            aum.update(batch, wrapper.last_logits, data.train_y[batch])
            scheduler.step()
    mentor = wrapper.mentor.eval()
    with torch.no_grad():
        probs = torch.cat([mentor(part).softmax(1) for part in data.train_x.split(500)]).numpy()
    wrong = labels != clean
    margin, given_prob = aum.scores, probs[np.arange(len(labels)), labels]
    flags = {"vote": vote.flagged, "AUM < 0": margin < 0, "mentor disagrees": probs.argmax(1) != labels}
    suspicion = {"vote": vote.scores, "AUM < 0": -margin, "mentor disagrees": 1 - given_prob}
    two_of_three = sum(f.astype(int) for f in flags.values()) >= 2
    mean_rank = sum(np.argsort(np.argsort(s)) for s in suspicion.values()) / 3
    result = {name: flag_scores(wrong, flags[name], suspicion[name]) for name in flags}
    result["two of three"] = flag_scores(wrong, two_of_three, mean_rank)
    result["AUM and mentor"] = flag_scores(wrong, flags["AUM < 0"] & flags["mentor disagrees"], None)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=EMBEDDED_DEFAULTS["epochs"], help="default: the embedded run's")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--reuse", action="store_true", help="score the runs already in benchmarks/label_issues/")
    parser.add_argument("--finetune", action="store_true", help="the fine-tuning benchmark's pretrained ResNet")
    args = parser.parse_args(argv)
    if args.finetune:
        lines = [
            "## The label-error report on a pretrained ResNet (`python benchmarks/label_issues.py --finetune --write`)",
            "",
            "The fine-tuning benchmark's ResNet and target task, the recipe for 25 epochs without cleaning, seed 0.",
            "",
            "| noise | signal | flagged | precision | recall | F1 | top-100 precision |",
            "|---|---|---|---|---|---|---|",
        ]
        for setting in ("sym40", "clean"):
            for name, row in finetune_signals(setting).items():
                cells = [f"{100 * row[key]:.1f}%" if np.isfinite(row[key]) else "-" for key in row]
                lines.append(f"| {setting} | {name} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
        if args.write:
            write_section("label_issues_finetune", lines)
        return
    epochs = args.epochs
    lines = [
        f"## The label-error report (`python benchmarks/label_issues.py {' '.join(argv or sys.argv[1:])}`)",
        "",
        f"The embedded run (a small timm ResNet from scratch, 4,000 MNIST digits, {epochs} epochs, seed 0).",
        "",
        "| noise | signal | flagged | precision | recall | F1 | top-100 precision |",
        "|---|---|---|---|---|---|---|",
    ]
    for rate in (0.4, 0.0):
        output = run(rate, epochs, args.reuse)
        for name, row in scores(output).items():
            cells = [f"{100 * row[key]:.1f}%" if np.isfinite(row[key]) else "-" for key in row]
            lines.append(f"| {f'sym {int(100 * rate)}%' if rate else 'none'} | {name} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
        if rate:
            cost = collection_cost(output)
    lines += [
        "",
        f"Collecting the margins: {cost['seconds']:.3f} s over the run's batches against "
        f"{cost['training_seconds']:.0f} s of training ({100 * cost['share']:.2f}%).",
    ]
    print("\n".join(lines))
    if args.write:
        write_section("label_issues", lines)


if __name__ == "__main__":
    main()
