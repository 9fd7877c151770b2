"""The privacy-utility curve of grid ``privacy-fmnist``: final accuracy against epsilon.

    python -m experiments.privacy_curve

Reads ``docs/results/privacy-fmnist/runs/*/summary.json`` (runs named
``eps<target>__<split>__s<seed>`` and ``nodp__<split>__s<seed>``), keeps the completed
ones, and writes ``docs/results/privacy-fmnist/curve.md`` (per split and target: the
epsilon actually spent, the noise multiplier, final test accuracy, mean ± std over the
seeds run, and how many) and ``curve.png``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "privacy-fmnist"


def collect() -> dict[tuple[str, str], list[dict]]:
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for path in sorted((RESULTS / "runs").glob("*/summary.json")):
        summary = json.loads(path.read_text())
        if summary.get("status") != "completed":
            continue
        label, split, _ = path.parent.name.split("__")
        last = summary["history"][-1]
        cells[(split, label)].append({
            "accuracy": 100 * summary["final_test_accuracy"],
            "epsilon": last.get("dp_epsilon_max"),
            "sigma": last.get("dp_noise_multiplier"),
        })
    return cells


def _mean(values: list[float]) -> str:
    v = np.array(values, dtype=float)
    return f"{v.mean():.2f}" + (f" ± {v.std(ddof=1):.2f}" if len(v) > 1 else "")


def main() -> int:
    cells = collect()
    splits = sorted({split for split, _ in cells}, key=lambda s: (s != "iid", s))
    lines = ["# privacy-fmnist: final test accuracy against the privacy spent\n",
             "| split | run | epsilon spent (max over clients) | sigma | final test accuracy % | seeds |",
             "|---|---|---|---|---|---|"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for split in splits:
        labels = sorted((label for s, label in cells if s == split),
                        key=lambda l: float("inf") if l == "nodp" else float(l[3:]))
        xs, ys, es = [], [], []
        for label in labels:
            runs = cells[(split, label)]
            acc = [r["accuracy"] for r in runs]
            if label == "nodp":
                lines.append(f"| {split} | no DP | – | – | {_mean(acc)} | {len(runs)} |")
                ax.axhline(np.mean(acc), ls="--", lw=1,
                           color="C0" if split == "iid" else "C1", label=f"{split}, no DP")
                continue
            eps = [r["epsilon"] for r in runs]
            lines.append(f"| {split} | target {label[3:]} | {_mean(eps)} | "
                         f"{runs[0]['sigma']:.3f} | {_mean(acc)} | {len(runs)} |")
            xs.append(np.mean(eps))
            ys.append(np.mean(acc))
            es.append(np.std(acc, ddof=1) if len(acc) > 1 else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3,
                        color="C0" if split == "iid" else "C1", label=f"{split}, DP-SGD")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon spent after 20 rounds (delta = 1e-5, per client)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("Fashion-MNIST, 10 clients, sample-level DP-SGD")
    ax.legend(fontsize=8)
    fig.savefig(RESULTS / "curve.png", dpi=110, bbox_inches="tight")
    (RESULTS / "curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
