"""The robustness matrix of a robustness grid: defence x attack, mean over the seeds run.

    python -m experiments.robustness_table robustness-digits
    python -m experiments.robustness_table robustness-fmnist

Reads ``docs/results/<grid>/runs/*/summary.json`` (runs named
``<defence>-<attack><k>__<split>__s<seed>``, see ``experiments/grids.py``), keeps the
completed ones, and writes ``docs/results/<grid>/matrix.md`` (final test accuracy, mean
± standard deviation over seeds, the number of seeds in brackets when not every cell has
the same) and ``matrix.png`` (one heatmap per split, 2 attackers and no attack).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .grids import DEFENCES, GRIDS

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
ATTACKS = ("signflip", "gaussian", "labelflip", "alie", "ipm")


def collect(grid: str) -> dict[tuple[str, str, str], dict[int, float]]:
    """(split, defence, attack label) -> {seed: final test accuracy %}."""
    cells: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    for path in (RESULTS / grid / "runs").glob("*/summary.json"):
        summary = json.loads(path.read_text())
        if summary.get("status") != "completed":
            continue
        label, split, seed = GRIDS[grid].parse_run_name(path.parent.name)
        defence, attack = label.split("-", 1)
        cells[(split, defence, attack)][seed] = 100 * summary["final_test_accuracy"]
    return cells


def fmt(values: dict[int, float], seeds: int) -> str:
    if not values:
        return ""
    v = np.array(list(values.values()))
    text = f"{v.mean():.1f}" + (f" ± {v.std(ddof=1):.1f}" if len(v) > 1 else "")
    return text + (f" ({len(v)})" if len(v) != seeds else "")


def table(cells, split: str, attacks: list[str], seeds: int) -> str:
    defences = list(DEFENCES)
    lines = ["| attack | " + " | ".join(defences) + " |", "|---" * (len(defences) + 1) + "|"]
    for attack in attacks:
        row = [fmt(cells.get((split, d, attack), {}), seeds) for d in defences]
        if any(row):
            lines.append(f"| {attack} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def heatmap(cells, splits: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defences = list(DEFENCES)
    attacks = ["none"] + [f"{a}2" for a in ATTACKS]
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4.2), squeeze=False)
    for ax, split in zip(axes[0], splits):
        grid = np.full((len(attacks), len(defences)), np.nan)
        for i, attack in enumerate(attacks):
            for j, defence in enumerate(defences):
                values = cells.get((split, defence, attack))
                if values:
                    grid[i, j] = np.mean(list(values.values()))
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn")
        ax.set_xticks(range(len(defences)), defences, rotation=30, ha="right")
        ax.set_yticks(range(len(attacks)), attacks)
        for i in range(len(attacks)):
            for j in range(len(defences)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
        ax.set_title(f"{split}: final test accuracy %, 2 attackers of 10")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", choices=[g for g in GRIDS if g.startswith("robustness")])
    args = parser.parse_args(argv)
    grid = GRIDS[args.grid]
    cells = collect(args.grid)
    attacks = ["none"] + [f"{a}{k}" for a in ATTACKS for k in (1, 2, 3)]
    seeds = len(grid.seeds)
    parts = [f"# {grid.name}: final test accuracy (%), mean ± std over seeds\n",
             grid.description + "\n",
             f"A number in brackets: seeds run for that cell, when fewer than {seeds}.\n"]
    for split in grid.splits:
        parts.append(f"\n## {split}\n\n" + table(cells, split, attacks, seeds) + "\n")
    out = RESULTS / args.grid
    (out / "matrix.md").write_text("\n".join(parts))
    heatmap(cells, list(grid.splits), out / "matrix.png")
    print((out / "matrix.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
