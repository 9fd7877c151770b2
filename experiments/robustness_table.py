"""The robustness matrix of a robustness grid: defence x attack, mean over the seeds run.

    python -m experiments.robustness_table robustness-digits
    python -m experiments.robustness_table robustness-fmnist

Reads ``docs/results/<grid>/runs/*/summary.json`` (runs named
``<defence>-<attack><k>__<split>__s<seed>``, see ``experiments/grids.py``), keeps the
completed ones, and writes ``docs/results/<grid>/matrix.md`` (final test accuracy, mean
± standard deviation over seeds, the number of seeds in brackets when not every cell has
the same) and ``matrix.png`` (one heatmap per split: no attack and the grid's headline
number of attackers, 2 of 10 or 10 of 50). ``python -m experiments.docs_check`` rebuilds
matrix.md from the records (:func:`build_matrix`) and fails if the committed one differs.
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


def records(grid: str, results: Path = RESULTS) -> list[tuple[tuple[str, str, str], int, dict]]:
    """Each completed run's ((split, defence, attack label), seed, summary), read once."""
    out = []
    for path in (results / grid / "runs").glob("*/summary.json"):
        summary = json.loads(path.read_text())
        if summary.get("status") != "completed":
            continue
        label, split, seed = GRIDS[grid].parse_run_name(path.parent.name)
        defence, attack = label.split("-", 1)
        out.append(((split, defence, attack), seed, summary))
    return out


def collect(grid: str, results: Path = RESULTS,
            runs=None) -> dict[tuple[str, str, str], dict[int, float]]:
    """(split, defence, attack label) -> {seed: final test accuracy %}; ``runs``: what
    ``records`` returned, else read."""
    cells: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    for key, seed, summary in records(grid, results) if runs is None else runs:
        cells[key][seed] = 100 * summary["final_test_accuracy"]
    return cells


def collect_kept(grid: str, results: Path = RESULTS,
                 runs=None) -> dict[tuple[str, str, str], dict[int, int]]:
    """(split, defence, attack label) -> {seed: attackers' replies the rule kept, summed over
    the rounds}, for the rules that select replies (those whose rounds record
    ``attackers_selected``: Krum, Multi-Krum, Bulyan) and the runs with attackers."""
    kept: dict[tuple[str, str, str], dict[int, int]] = defaultdict(dict)
    for key, seed, summary in records(grid, results) if runs is None else runs:
        selected = [r.get("attackers_selected") for r in summary["history"][1:]]
        if any(v is not None for v in selected):
            kept[key][seed] = int(sum(v or 0 for v in selected))
    return kept


def by_seed(values: dict[int, int]) -> str:
    """A kept-attackers cell: the counts in seed order (s0 / s1 / ...)."""
    return " / ".join(str(v) for _, v in sorted(values.items()))


def fmt(values: dict[int, float], seeds: int) -> str:
    if not values:
        return ""
    v = np.array(list(values.values()))
    text = f"{v.mean():.1f}" + (f" ± {v.std(ddof=1):.1f}" if len(v) > 1 else "")
    return text + (f" ({len(v)})" if len(v) != seeds else "")


def defences_of(cells) -> list[str]:
    """The defences the records hold, in DEFENCES' order."""
    present = {defence for _, defence, _ in cells}
    return [d for d in DEFENCES if d in present]


def attacks_of(cells) -> list[str]:
    """"none", then each attack label the records hold (ATTACKS' order, then attackers)."""
    def key(label: str) -> tuple[int, int]:
        name = label.rstrip("0123456789")
        return ATTACKS.index(name), int(label[len(name):])

    present = {attack for _, _, attack in cells} - {"none"}
    return ["none"] + sorted(present, key=key)


def headline_attackers(cells) -> int:
    """The number of attackers the heatmap shows: 2 where recorded (the 10-client grids),
    else the largest recorded."""
    counts = {int(a[len(a.rstrip("0123456789")):]) for a in attacks_of(cells)[1:]}
    return 2 if 2 in counts or not counts else max(counts)


def table(cells, split: str, attacks: list[str], cell) -> str:
    """Rows: attacks; columns: the defences ``cells`` holds; ``cell(values)`` writes one."""
    defences = defences_of(cells)
    lines = ["| attack | " + " | ".join(defences) + " |", "|---" * (len(defences) + 1) + "|"]
    for attack in attacks:
        row = [cell(cells.get((split, d, attack), {})) if cells.get((split, d, attack)) else ""
               for d in defences]
        if any(row):
            lines.append(f"| {attack} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def heatmap(cells, splits: list[str], path: Path, num_clients: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defences = defences_of(cells)
    k = headline_attackers(cells)
    attacks = ["none"] + [f"{a}{k}" for a in ATTACKS]
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
        ax.set_title(f"{split}: final test accuracy %, {k} attackers of {num_clients}")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def build_matrix(grid_name: str, results: Path = RESULTS) -> str:
    """matrix.md's text from the grid's committed records."""
    grid = GRIDS[grid_name]
    runs = records(grid_name, results)
    cells = collect(grid_name, runs=runs)
    seeds = len(grid.seeds)
    parts = [f"# {grid.name}: final test accuracy (%), mean ± std over seeds\n",
             grid.description + "\n",
             f"A number in brackets: seeds run for that cell, when fewer than {seeds}.\n"]
    def accuracy(values):
        return fmt(values, seeds)

    for split in grid.splits:
        parts.append(f"\n## {split}\n\n" + table(cells, split, attacks_of(cells), accuracy) + "\n")
    kept = collect_kept(grid_name, runs=runs)
    if kept:
        k = headline_attackers(cells)
        attacks = [a for a in attacks_of(cells)[1:] if a.endswith(str(k))]
        rounds = grid.base.get("num-server-rounds")
        parts.append(f"\n## Attackers' replies kept, {k} attackers\n\n"
                     f"Summed over the {rounds} rounds, by seed (s0 / s1 / ...), for the rules "
                     f"that select replies.\n")
        for split in grid.splits:
            parts.append(f"\n### {split}\n\n" + table(kept, split, attacks, by_seed) + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", choices=[g for g in GRIDS if g.startswith("robustness")])
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="root of grid outputs (run_grid's --out; default docs/results)")
    args = parser.parse_args(argv)
    grid = GRIDS[args.grid]
    out = args.results / args.grid
    (out / "matrix.md").write_text(build_matrix(args.grid, args.results))
    heatmap(collect(args.grid, args.results), list(grid.splits), out / "matrix.png",
            grid.num_supernodes)
    print((out / "matrix.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
