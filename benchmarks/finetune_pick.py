"""How the fine-tuning recipe was picked: every candidate's margin over the best baseline on the noisy validation
split, per explored cell, at the final epoch and at the epoch the split selects; the candidates ranked by their worst
margin (the rule: one setting for both models, no cell left behind).

    python benchmarks/finetune_pick.py benchmarks/finetune_fast_step_tune/*.json
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from finetune_accuracy import picked

#: The baselines a user would run instead (``ce_early``: ``ce`` at the selected epoch).
BASELINES = ("ce", "gce", "clean_ce", "clean_ce_pc", "ema", "ce_lpft")


def margins(files: list[Path]) -> tuple[list[tuple[str, str]], dict[str, list[tuple[float, float]]]]:
    cells: dict[tuple[str, str], dict[str, tuple[float, float]]] = collections.defaultdict(dict)
    for path in files:
        for run in json.loads(path.read_text()):
            name = run["method"] if run["method"] in BASELINES else f"{run['method']} ({path.stem})"
            values = tuple(100 * picked(run, run["method"], rule, "val") for rule in ("final", "selected"))
            cells[(run["arch"], run["setting"])][name] = values
            if run["method"] == "ce":
                cells[(run["arch"], run["setting"])]["ce_early"] = (values[1], values[1])
    order = sorted(cells)
    best = {cell: [max(v[i] for n, v in cells[cell].items() if n in (*BASELINES, "ce_early")) for i in (0, 1)]
            for cell in order}  # fmt: skip
    candidates = {n for cell in order for n in cells[cell] if n not in (*BASELINES, "ce_early")}
    table = {
        name: [(cells[c][name][0] - best[c][0], cells[c][name][1] - best[c][1]) for c in order]
        for name in candidates
        if all(name in cells[c] for c in order)
    }
    return order, table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    order, table = margins(args.files)
    print("margin over the best baseline on noisy validation, final / selected epoch")
    print(f"| candidate | worst | {' | '.join(f'{a} {s}' for a, s in order)} |")
    print(f"|---|---|{'---|' * len(order)}")
    for name, values in sorted(table.items(), key=lambda item: -min(min(v) for v in item[1])):
        cells = " | ".join(f"{a:+.1f} / {b:+.1f}" for a, b in values)
        print(f"| {name} | {min(min(v) for v in values):+.1f} | {cells} |")


if __name__ == "__main__":
    main()
