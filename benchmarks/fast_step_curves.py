"""Per-epoch curves of the fine-tuning benchmark's runs: the noisy-validation accuracy beside what the fast step did
(its divergence ``KL(student || fast student)`` and its relative length ``||theta' - theta|| / ||theta||``), for the
runs that helped and those that collapsed.

    python benchmarks/fast_step_curves.py benchmarks/finetune/runs.json --regime short --output curves.png

Each input is a ``runs.json`` / ``tune.json`` of `finetune_accuracy.py` (runs of the 0.3 release and later carry
``meta_curves``); a run is labelled by its method, its ``inner_divergence`` and its file's folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def label(run: dict, path: Path) -> str:
    target = (run.get("config") or {}).get("inner_divergence")
    return f"{run['method']}" + (f" KL {target:g}" if target else "") + f" ({path.parent.name})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="runs.json / tune.json files")
    parser.add_argument("--setting", default="sym40")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--regime", default="long", help="long or short (runs without a regime are short)")
    parser.add_argument("--output", type=Path, default=Path("fast_step_curves.png"))
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = ("resnet", "vit")
    fig, axes = plt.subplots(len(archs), 3, figsize=(15, 4.2 * len(archs)), squeeze=False)
    for path in args.runs:
        for run in json.loads(path.read_text()):
            if run["setting"] != args.setting or run["seed"] != args.seed or not run.get("meta_curves"):
                continue
            if run.get("regime", "short") != args.regime:
                continue
            row = axes[archs.index(run["arch"])]
            epochs = range(1, len(run["student_val"]) + 1)
            name = label(run, path)
            row[0].plot(epochs, [100 * v for v in run["student_val"]], marker=".", label=name)
            for ax, key in zip(row[1:], ("fast_divergence", "fast_step")):
                ax.plot(epochs, run["meta_curves"][key], marker=".", label=name)
    for arch, row in zip(archs, axes):
        title = f"{arch}, {args.setting}, {args.regime}: noisy-validation accuracy (student)"
        row[0].set(title=title, xlabel="epoch", ylabel="%")
        row[1].set(title="fast step: KL(student || fast student)", xlabel="epoch", yscale="log")
        row[2].set(title="fast step: ||theta' - theta|| / ||theta||", xlabel="epoch", yscale="log")
        for ax in row:
            ax.grid(alpha=0.3)
        row[0].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(args.output, dpi=90)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
