"""Collect the summaries of a grid into tables (Markdown, CSV) and plots.

Figures are final-round test accuracy (not best-over-rounds, which is biased upward),
mean ± sample standard deviation over the seeds that finished; "rounds to X" is the first
round whose test accuracy reaches the grid's target (mean over the seeds that reached it,
with how many did). The CSV also has the mean training-phase seconds per warm round
(configure, client training, replies, aggregation) and its ratio to the baseline's; a
grid runs for hours on a shared machine, so these are indicative only: the Markdown
table leaves them out, and experiments/benchmark_round.py measures strategy cost in one
quiet, interleaved run instead.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .grids import Grid


def load_summaries(runs_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(runs_dir.glob("*/summary.json")):
        try:
            summary = json.loads(path.read_text())
        except ValueError:
            continue
        if summary.get("complete") and "__" in path.parent.name:
            out[path.parent.name] = summary
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def rounds_to_target(history: list[dict[str, Any]], target: float) -> int | None:
    for record in history:
        if record["round"] > 0 and record["test_accuracy"] >= target:
            return record["round"]
    return None


def _train_seconds(history: list[dict[str, Any]]) -> float:
    # Round 1 pays the simulation's warm-up (actors, data loading): leave it out.
    warm = [r["train_seconds"] for r in history if r["round"] > 1 and "train_seconds" in r]
    return statistics.fmean(warm) if warm else float("nan")


def aggregate(grid: Grid, summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for name, summary in summaries.items():
        label, split, _seed = Grid.parse_run_name(name)
        cells[(label, split)].append(summary)
    base_time = {
        split: statistics.fmean(_train_seconds(s["history"]) for s in cells[(grid.baseline, split)])
        for split in grid.splits if cells.get((grid.baseline, split))
    }
    rows = []
    for split in grid.splits:
        for label in grid.strategies:
            runs = cells.get((label, split), [])
            if not runs:
                continue
            final = [s["final_test_accuracy"] for s in runs]
            target = grid.target_for(split)
            reached = [r for r in (rounds_to_target(s["history"], target) for s in runs)
                       if r is not None]
            seconds = statistics.fmean(_train_seconds(s["history"]) for s in runs)
            # The largest round's upload: a round whose replies were all rejected uploads 0.
            upload = statistics.fmean(
                max((r.get("upload_bytes_per_client", 0) for r in s["history"]), default=0)
                for s in runs)
            mean, std = _mean_std(final)
            rows.append({
                "split": split,
                "strategy": label,
                "seeds": len(runs),
                "final_acc_mean": mean,
                "final_acc_std": std,
                "best_acc_mean": statistics.fmean(s["best_test_accuracy"] for s in runs),
                "target_accuracy": target,
                "rounds_to_target_mean": statistics.fmean(reached) if reached else None,
                "reached_target": len(reached),
                "train_seconds_per_round": seconds,
                "time_vs_baseline": seconds / base_time[split] if split in base_time else None,
                "upload_bytes_per_client": upload,
            })
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    if not rows:
        return
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(grid: Grid, rows: list[dict[str, Any]]) -> str:
    if grid.split_targets:
        target_head = "rounds to target (see split)"
    else:
        target_head = f"rounds to {grid.target_accuracy:.0%}"
    head = (f"| split | strategy | seeds | final test acc (mean ± std) | best acc | {target_head} "
            f"| upload / client |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    def split_note(r: dict[str, Any]) -> str:
        return f" (target {r['target_accuracy']:.0%})" if grid.split_targets else ""

    for r in rows:
        target = (f"{r['rounds_to_target_mean']:.1f} ({r['reached_target']}/{r['seeds']})"
                  if r["rounds_to_target_mean"] is not None else f"— (0/{r['seeds']})")
        lines.append(
            f"| {r['split']}{split_note(r)} | {r['strategy']} | {r['seeds']} | "
            f"{100 * r['final_acc_mean']:.2f} ± {100 * r['final_acc_std']:.2f} | "
            f"{100 * r['best_acc_mean']:.2f} | {target} | "
            f"{r['upload_bytes_per_client'] / 1024:.0f} KiB |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(grid: Grid, summaries: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    splits = [s for s in grid.splits if any(Grid.parse_run_name(n)[1] == s for n in summaries)]
    if not splits:
        return
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.6), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for label in grid.strategies:
            curves = [s["history"] for n, s in summaries.items()
                      if Grid.parse_run_name(n)[:2] == (label, split)]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            acc = np.array([[r["test_accuracy"] for r in c[:length]] for c in curves])
            rounds = [r["round"] for r in curves[0][:length]]
            mean = acc.mean(0)
            ax.plot(rounds, mean, label=f"{label} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(rounds, acc.min(0), acc.max(0), alpha=0.15)
        ax.set_title(split)
        ax.set_xlabel("round")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    import textwrap

    title = textwrap.fill(grid.description, width=int(40 * len(splits)))
    fig.suptitle(title + "\nLines: mean over seeds; bands: min-max over seeds.", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(grid: Grid, out_dir: Path) -> list[dict[str, Any]]:
    summaries = load_summaries(out_dir / "runs")
    rows = aggregate(grid, summaries)
    write_csv(rows, out_dir / "table.csv")
    (out_dir / "table.md").write_text(
        f"# Grid `{grid.name}`\n\n{grid.description}\n\n"
        f"Settings: {json.dumps(grid.base)}; {grid.num_supernodes} clients; seeds "
        f"{list(grid.seeds)}; {len(summaries)} of {len(grid.runs())} runs complete.\n\n"
        + markdown_table(grid, rows)
        + "".join(f"\n{note}\n" for note in grid.notes)
    )
    plot_curves(grid, summaries, out_dir / "curves.png")
    return rows
