"""The privacy-utility curve of grid ``privacy-fmnist``: accuracy against epsilon.

    python -m experiments.privacy_curve
    python -m experiments.privacy_curve --runs docs/results/privacy-fmnist/superseded-2026-12/runs --out /tmp/old

Reads ``<runs>/*/summary.json`` (runs named ``eps<target>__<split>__s<seed>`` and
``nodp__<split>__s<seed>``), keeps the completed ones, and writes ``curve.md`` (per split
and target: the seeds, the epsilon actually spent, the noise multiplier, the final test
accuracy and the mean of the last 10 rounds, each mean ± std over the seeds, and the cost
against no DP over the seeds both have; then the cost alone, per target and split, with
its 95 % t-interval over the paired seeds, the table the README includes) and
``curve.png``. ``build_curve`` is what
``experiments.docs_check`` regenerates to check the committed ``curve.md``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from experiments.report import LAST_ROUNDS, _t_summary, last_rounds_mean

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "privacy-fmnist"

Cells = dict[tuple[str, str], dict[int, dict]]


def collect(runs: Path) -> Cells:
    """(split, label) -> seed -> that run's accuracy, last-10 mean, epsilon and sigma."""
    cells: Cells = defaultdict(dict)
    for path in sorted(Path(runs).glob("*/summary.json")):
        summary = json.loads(path.read_text())
        if summary.get("status") != "completed":
            continue
        label, split, seed = path.parent.name.split("__")
        last = summary["history"][-1]
        cells[(split, label)][int(seed.removeprefix("s"))] = {
            "accuracy": 100 * summary["final_test_accuracy"],
            "last": 100 * last_rounds_mean(summary["history"]),
            "epsilon": last.get("dp_epsilon_max"),
            "sigma": last.get("dp_noise_multiplier"),
        }
    return cells


def _mean(values: list[float]) -> str:
    v = np.array(values, dtype=float)
    return f"{v.mean():.2f}" + (f" ± {v.std(ddof=1):.2f}" if len(v) > 1 else "")


def _order(label: str) -> float:
    return float("inf") if label == "nodp" else float(label.removeprefix("eps"))


def _cost(runs: dict[int, dict], nodp: dict[int, dict], key: str) -> str:
    seeds = sorted(set(runs) & set(nodp))
    if not seeds:
        return "–"
    return f"{np.mean([runs[s][key] - nodp[s][key] for s in seeds]):+.2f}"


def _cost_interval(runs: dict[int, dict], nodp: dict[int, dict], key: str) -> str:
    """DP minus no DP over the seeds both have: mean [95 % t-interval], in points."""
    seeds = sorted(set(runs) & set(nodp))
    if not seeds:
        return "–"
    mean, low, high, _ = _t_summary([runs[s][key] - nodp[s][key] for s in seeds])
    if len(seeds) == 1:
        return f"{mean:+.2f} (1 seed)"
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def cost_table(cells: Cells, splits: list[str]) -> list[str]:
    """Per target epsilon (rows) and split (columns): what DP-SGD costs against no DP,
    final round and last-10 mean, with the seeds each split's no-DP runs have; a cell
    paired over other seeds names them."""
    targets = sorted({lab for _, lab in cells if lab != "nodp"}, key=_order, reverse=True)
    header, cols = ["target epsilon"], []
    for split in splits:
        nodp = cells.get((split, "nodp"), {})
        seeds = ("seeds " + ", ".join(str(s) for s in sorted(nodp))) if nodp else "no no-DP run"
        header += [f"{split}: final round ({seeds})", f"{split}: last {LAST_ROUNDS} rounds"]
        cols.append((split, nodp))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in targets:
        row = [label.removeprefix("eps")]
        for split, nodp in cols:
            runs_ = cells.get((split, label), {})
            paired = sorted(set(runs_) & set(nodp))
            note = ("" if paired == sorted(nodp) or not paired
                    else f" (seeds {', '.join(str(s) for s in paired)})")
            row += [_cost_interval(runs_, nodp, "accuracy") + note,
                    _cost_interval(runs_, nodp, "last") + note]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def build_curve(runs: Path) -> tuple[str, Cells]:
    """curve.md's text, and the cells it was built from (for the plot)."""
    cells = collect(runs)
    splits = sorted({split for split, _ in cells}, key=lambda s: (s != "iid", s))
    lines = ["# privacy-fmnist: test accuracy against the privacy spent\n",
             "Epsilon: the largest any client spent (delta 1e-5), mean over the seeds; "
             "sigma: the noise multiplier, mean over the seeds; accuracy %, mean ± std "
             f"over the seeds; last {LAST_ROUNDS}: the mean of the last {LAST_ROUNDS} "
             "rounds; cost: DP minus no DP, mean over the seeds both have (final; "
             f"last {LAST_ROUNDS}).\n",
             f"| split | run | seeds | epsilon spent | sigma | final test accuracy % "
             f"| last {LAST_ROUNDS} rounds % | cost against no DP, points |",
             "|---|---|---|---|---|---|---|---|"]
    for split in splits:
        nodp = cells.get((split, "nodp"), {})
        for label in sorted((lab for s, lab in cells if s == split), key=_order):
            runs_ = cells[(split, label)]
            seeds = ", ".join(str(s) for s in sorted(runs_))
            acc = _mean([r["accuracy"] for r in runs_.values()])
            last = _mean([r["last"] for r in runs_.values()])
            if label == "nodp":
                lines.append(f"| {split} | no DP | {seeds} | – | – | {acc} | {last} | – |")
                continue
            eps = np.mean([r["epsilon"] for r in runs_.values()])
            sigma = np.mean([r["sigma"] for r in runs_.values()])
            cost = f"{_cost(runs_, nodp, 'accuracy')}; {_cost(runs_, nodp, 'last')}"
            lines.append(f"| {split} | target {label.removeprefix('eps')} | {seeds} | "
                         f"{eps:.2f} | {sigma:.3f} | {acc} | {last} | {cost} |")
    lines += ["", "What DP-SGD costs against no DP, in points (DP minus no DP, seed by seed; "
              "mean [95 % t-interval over the seeds]):", "", *cost_table(cells, splits)]
    return "\n".join(lines) + "\n", cells


def plot(cells: Cells, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for split, color in (("iid", "C0"), ("dir0.5", "C1")):
        labels = sorted((lab for s, lab in cells if s == split and lab != "nodp"), key=_order)
        if (split, "nodp") in cells:
            ax.axhline(np.mean([r["accuracy"] for r in cells[(split, "nodp")].values()]),
                       ls="--", lw=1, color=color, label=f"{split}, no DP")
        if not labels:
            continue
        xs = [np.mean([r["epsilon"] for r in cells[(split, lab)].values()]) for lab in labels]
        acc = [[r["accuracy"] for r in cells[(split, lab)].values()] for lab in labels]
        ax.errorbar(xs, [np.mean(a) for a in acc],
                    yerr=[np.std(a, ddof=1) if len(a) > 1 else 0.0 for a in acc],
                    marker="o", capsize=3, color=color, label=f"{split}, DP-SGD")
    ax.set_xscale("log")
    ticks = sorted({float(lab.removeprefix("eps")) for _, lab in cells if lab != "nodp"})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("epsilon spent after 20 rounds (delta = 1e-5, per client)")
    ax.set_ylabel("final test accuracy (%), mean ± std over seeds")
    ax.set_title("Fashion-MNIST, 10 clients, sample-level DP-SGD")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=RESULTS / "runs",
                        help="the runs folder (default: the grid's)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="where curve.md and curve.png go (default: the grid's folder)")
    args = parser.parse_args(argv)
    text, cells = build_curve(args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curve.md").write_text(text)
    plot(cells, args.out / "curve.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
