"""Accuracy against cost on the from-scratch benchmark, from the runs of several `accuracy.py` commands.

    python benchmarks/cost_chart.py   # benchmarks/accuracy/accuracy_vs_cost.png and a table

Each ``runs.json`` (default: the main table, the cheaper modes and the affordable preset) gives
every method's final-epoch student accuracy (mean over seeds), its gain over cross-entropy and
its seconds per run divided by cross-entropy's, both against the cross-entropy runs *in the
same file* (runs made on other days, other machines or torch versions are compared through
their own cross-entropy). A method in several files is taken from the last. The table gives,
per noisy setting, the share of full second-order MLNT's gain each method keeps:
``gain / gain_so``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
DEFAULT_RUNS = [
    HERE / "accuracy" / "runs.json",
    HERE / "accuracy_cheap" / "runs.json",
    HERE / "accuracy_fast" / "runs.json",
]
SETTINGS = ["sym50", "sym80", "pair40", "inst40", "clean"]


def summarise(files: list[Path]) -> dict[tuple[str, str], dict[str, float]]:
    """``{(setting, method): {"acc": mean final student %, "gain": acc - same-file ce's, "x_ce": seconds /
    same-file ce's, "seeds": n}}``."""
    table: dict[tuple[str, str], dict[str, float]] = {}
    for path in files:
        runs: list[dict[str, Any]] = json.loads(path.read_text())
        for setting in SETTINGS:
            ce = [r for r in runs if r["setting"] == setting and r["method"] == "ce"]
            if not ce:
                continue
            ce_acc = statistics.fmean(100 * r["student"][-1] for r in ce)
            ce_seconds = statistics.fmean(r["seconds"] for r in ce)
            for method in dict.fromkeys(r["method"] for r in runs if r["setting"] == setting):
                mine = [r for r in runs if r["setting"] == setting and r["method"] == method]
                acc = statistics.fmean(100 * r["student"][-1] for r in mine)
                table[setting, method] = {
                    "acc": acc,
                    "gain": acc - ce_acc,
                    "x_ce": statistics.fmean(r["seconds"] for r in mine) / ce_seconds,
                    "seeds": len(mine),
                }
    return table


def gain_table(table: dict[tuple[str, str], dict[str, float]]) -> list[str]:
    """Markdown: per method, cost per run against CE and the share of the SO gain kept per noisy setting."""
    noisy = [s for s in SETTINGS if s != "clean" and (s, "ce") in table and (s, "mlnt_so") in table]
    methods = list(dict.fromkeys(method for _, method in table if method != "ce"))
    lines = [
        "| method | " + " | ".join(f"{s} acc (gain kept)" for s in noisy) + " | clean acc | x ce per run |",
        "|---|" + "---|" * (len(noisy) + 2),
    ]
    for method in methods:
        cells = []
        for setting in noisy:
            entry = table.get((setting, method))
            if entry is None:
                cells.append("")
                continue
            cells.append(f"{entry['acc']:.1f} ({100 * entry['gain'] / table[setting, 'mlnt_so']['gain']:.0f}%)")
        clean = table.get(("clean", method))
        costs = [e["x_ce"] for (s, m), e in table.items() if m == method]
        cells.append(f"{clean['acc']:.1f}" if clean else "")
        cells.append(f"{statistics.fmean(costs):.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def plot(table: dict[tuple[str, str], dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if any(key[0] == s for key in table)]
    methods = list(dict.fromkeys(method for _, method in table))
    colours = dict(zip(methods, plt.get_cmap("tab20").colors))
    fig, axes = plt.subplots(1, len(settings), figsize=(3.2 * len(settings), 3.4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for method in methods:
            entry = table.get((setting, method))
            if entry is not None:
                ax.scatter(entry["x_ce"], entry["acc"], color=colours[method], label=method, s=28)
        ax.set_xscale("log")
        ax.set_xticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "16"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(setting, fontsize=9)
        ax.set_xlabel("wall time per run / ce")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("clean test acc., final student (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.suptitle("From scratch (SmallCNN, MNIST-5k): accuracy against cost, mean over seeds")
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, default=DEFAULT_RUNS, help="runs.json files, later ones win")
    parser.add_argument("--output", type=Path, default=HERE / "accuracy" / "accuracy_vs_cost.png")
    args = parser.parse_args(argv)
    table = summarise([path for path in args.runs if path.exists()])
    print("\n".join(gain_table(table)))
    plot(table, args.output)
    print(f"chart: {args.output}")


if __name__ == "__main__":
    main()
