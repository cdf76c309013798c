"""Detection before training on the fine-tuning benchmark: the majority vote against the per-class thresholds.

    python benchmarks/detection_thresholds.py            # both backbones, every setting, 3 seeds; RESULTS.md

For each pretrained backbone of `finetune_accuracy.py` (cached; pretrained on first use), each noise setting and
seed: `noisy_meta.detect_label_noise` on the starting model's features of the training split (k = 10), with the
majority vote (``threshold=None``) and confident learning's per-class thresholds (``threshold="per_class"``);
the share of the training split flagged and the flags' precision, recall and F1 against the true labels
(open-set images count as mislabelled). The clean setting's share is what detection costs a clean training set.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
from finetune_backbones import ARCHS, PRETRAIN, load_pretrained, pretrain
from finetune_data import SETTINGS, TARGET_CLASSES, target
from results_file import write_section

from noisy_meta.labels.detection import detect_label_noise, extract_features

HERE = Path(__file__).parent
THRESHOLDS = {"majority": None, "per_class": "per_class"}


def measure(arch: str, backbone: Path, setting: str, seed: int) -> dict[str, dict[str, float]]:
    data = target(setting, seed)
    model = load_pretrained(backbone, arch, len(TARGET_CLASSES))
    features = extract_features(model, data.train_x)
    labels, clean = data.train_y.numpy(), data.train_clean.numpy()
    found = {}
    for name, threshold in THRESHOLDS.items():
        report = detect_label_noise(features, labels, num_classes=len(TARGET_CLASSES), k=10, threshold=threshold,
                                    clean_labels=clean).report  # fmt: skip
        found[name] = {
            "flagged": report.num_flagged / report.num_samples,
            "precision": report.precision if report.precision is not None else float("nan"),
            "recall": report.recall if report.recall is not None else float("nan"),
            "f1": report.f1 if report.f1 is not None else float("nan"),
        }
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache", default=str(HERE / "finetune" / "pretrained"))
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = [
        "| model | setting | threshold | flagged | precision | recall | F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch in args.archs:
        backbone = pretrain(arch, PRETRAIN[arch], Path(args.cache))
        for setting in args.settings:
            runs = [measure(arch, backbone, setting, seed) for seed in args.seeds]
            for name in THRESHOLDS:
                cells = []
                for key in ("flagged", "precision", "recall", "f1"):
                    values = [run[name][key] for run in runs if not np.isnan(run[name][key])]
                    cells.append(f"{100 * statistics.fmean(values):.1f}%" if values and key == "flagged" else
                                 f"{statistics.fmean(values):.2f}" if values else "n/a")  # fmt: skip
                lines.append(f"| {arch} | {setting} | {name} | {' | '.join(cells)} |")
    print("\n".join(lines))
    if args.no_write:
        return
    command = "python benchmarks/detection_thresholds.py"
    write_section(
        "detection_thresholds",
        [
            "## Detection before training: the majority vote and the per-class thresholds",
            "",
            f"```bash\n{command}\n```",
            "",
            f"The fine-tuning benchmark's backbones and data, k = 10, seeds {args.seeds}, means over seeds; precision, "
            "recall and F1 of the flags against the true labels (n/a: nothing to find on clean labels):",
            "",
            *lines,
        ],
    )


if __name__ == "__main__":
    main()
