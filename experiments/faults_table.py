"""The faulty-client table of docs/reliability.md, from a faults grid's summaries.

    python -m experiments.faults_table                 # docs/results/faults-digits
    python -m experiments.faults_table faults-digits

Per label (fault kind and rate): the final test accuracy (mean ± std over the completed
seeds), the valid replies and the replies left out (rejected or missing) per round, the
rounds skipped (fewer valid replies than min-train-nodes) and the median round time.
Writes ``docs/results/<grid>/faults.md`` and prints it.
"""

from __future__ import annotations

import json
import statistics
import sys

from .run_grid import DEFAULT_OUT

KINDS = ("exception", "timeout", "nan", "shapes", "huge-examples")


def _row(summary: dict) -> dict:
    rounds = summary["history"][1:]
    return {"acc": 100 * summary["final_test_accuracy"],
            "valid": statistics.fmean(r["replies_valid"] for r in rounds),
            "lost": statistics.fmean(r.get("replies_rejected", 0) + r.get("replies_missing", 0)
                                     for r in rounds),
            "skipped": sum(1 for r in rounds if not r["round_aggregated"]),
            "seconds": statistics.median(r["round_seconds"] for r in rounds)}


def table(grid: str) -> str:
    rows: dict[str, list[dict]] = {}
    for run in sorted((DEFAULT_OUT / grid / "runs").iterdir()):
        try:
            summary = json.loads((run / "summary.json").read_text())
        except (OSError, ValueError):
            continue
        if summary.get("status") == "completed" and ".incomplete" not in run.name:
            rows.setdefault(run.name.split("__")[0], []).append(_row(summary))
    lines = ["| faulty clients | final test accuracy (%) | valid replies / round | left out / round "
             "| rounds skipped | median round (s) | seeds |", "|---|---|---|---|---|---|---|"]
    for label in ["none"] + [f"{k}{rate}" for k in KINDS for rate in (10, 30)]:
        if label not in rows:
            continue
        runs = rows[label]
        acc = [r["acc"] for r in runs]
        shown = f"{statistics.fmean(acc):.1f} ± {statistics.stdev(acc):.1f}" if len(acc) > 1 else f"{acc[0]:.1f}"
        kind = label.rstrip("0123456789")
        name = "none" if label == "none" else f"{kind}, {label[len(kind):]} %"
        mean = lambda key: statistics.fmean(r[key] for r in runs)  # noqa: E731
        lines.append(f"| {name} | {shown} | {mean('valid'):.1f} | {mean('lost'):.1f} | "
                     f"{mean('skipped'):.1f} | {mean('seconds'):.1f} | {len(runs)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    grid = (argv if argv is not None else sys.argv[1:]) or ["faults-digits"]
    text = table(grid[0])
    (DEFAULT_OUT / grid[0] / "faults.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
