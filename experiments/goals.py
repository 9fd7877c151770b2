"""The performance goals, met and not met, from their committed records (issue 24).

    python -m experiments.goals          # writes docs/benchmarks/goals.md

Each goal names its record (a JSON-lines file or a text record under docs/benchmarks/),
which of the record's rows measure it, and the limit. The table gives every selected
row's measurement and says "met" when all of them are within the limit, "not met" when
none is, and "mixed" otherwise. README.md includes the table; ``experiments.docs_check``
rebuilds it from the records and fails when the committed copy differs, so a goal's
figure cannot drift from its record, and a goal not met stays in the table beside the
ones met. Nothing in the app imports this module.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from experiments.records import read_records

BENCHMARKS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


@dataclass(frozen=True)
class Goal:
    what: str
    limit: float
    unit: str  # "x" (a ratio) or " min"
    record: str  # file name under docs/benchmarks/
    # the measurements: (value, when) for each row of the record that measures the goal
    measure: Callable[[list[dict] | str], list[tuple[float, str]]]
    decimals: int = 2
    where: str = ""  # the docs section that explains it


def _round_floor(rows) -> list[tuple[float, str]]:
    # the measurements with the floor warmed up first (the first row's floor was cold)
    return [(r["ratio_train_phase_vs_floor"], r["date"]) for r in rows if r.get("floor_warmed_up")]


def _dp_default(rows) -> list[tuple[float, str]]:
    # the default DP epoch: secure randomness, Opacus's ew mode, batch 32
    return [(r["ew_ratio"], r["when"]) for r in rows
            if r.get("batch_size") == 32 and r.get("randomness") == "secure" and "ew_ratio" in r]


def _secagg(model: str, clients: int):
    def measure(rows) -> list[tuple[float, str]]:
        # the current masks (AES-256-CTR); rows without mask_prg are the earlier code and
        # the flower-mt19937 rows a measurement-only comparison
        return [(r["round_ratio"], r["when"]) for r in rows
                if r["model"] == model and r["clients"] == clients
                and str(r.get("mask_prg", "")).startswith("aes-256-ctr")]
    return measure


def _deployment(rows) -> list[tuple[float, str]]:
    # the quiet pairs with warm ClientApps and prompt SuperNodes (deploy.local's defaults)
    return [(r["deployment_over_simulation"], r["when"]) for r in rows
            if r.get("kind") == "run" and r.get("dataset") == "fashion-mnist"
            and r.get("warm_clientapp") and r.get("supernode_pull_seconds") == 0.2
            and str(r.get("label", "")).startswith("quiet")]


def _startup_10k(rows) -> list[tuple[float, str]]:
    # the latest invocation at 10,000 nodes: the app's mean start-up over the minimal app's
    latest = max((r for r in rows if r.get("nodes") == 10000), key=lambda r: r["date"])
    s = latest["summary"]
    return [(s["fl_app/fedavg"]["startup_seconds"] / s["minimal"]["startup_seconds"], latest["date"])]


def _suite(text) -> list[tuple[float, str]]:
    seconds = float(re.search(r"passed.* in ([\d.]+)s", text)[1])
    when = re.search(r"(\d{4}-\d{2}-\d{2}) \d{2}:\d{2}", text)[1]
    return [(seconds / 60, when)]


GOALS = (
    Goal("a warm round's training phase against the plain-PyTorch floor, 10 clients, "
         "Fashion-MNIST", 1.05, "x", "round_overhead.jsonl", _round_floor,
         where="docs/benchmarks.md"),
    Goal("the default DP-SGD epoch (secure noise, `ew`, batch 32) against a plain epoch",
         1.5, "x", "dp_overhead.jsonl", _dp_default, where="docs/benchmarks.md"),
    Goal("a SecAgg+ round against a plain one, 10 clients, the 46,826-parameter CNN", 1.05,
         "x", "secagg_overhead.jsonl", _secagg("cnn", 10), decimals=3,
         where="docs/secure-aggregation.md"),
    Goal("a SecAgg+ round against a plain one, 50 clients, the 1.07M-parameter MLP", 1.15,
         "x", "secagg_overhead.jsonl", _secagg("mlp-1m", 50), decimals=3,
         where="docs/secure-aggregation.md"),
    Goal("a deployed round's training phase against the simulated one (warm ClientApps, "
         "prompt SuperNodes)", 1.5, "x", "deployment_profile.jsonl", _deployment,
         where="docs/deployment.md"),
    Goal("start-up at 10,000 simulated nodes against the minimal Flower app", 2.0, "x",
         "scale.jsonl", _startup_10k, where="docs/reliability.md"),
    Goal("the test suite, the README's command, fresh clone, 2 cores", 12.0, " min",
         "suite_time_2026-12-04b.txt", _suite, decimals=1, where="README.md"),
)


def verdict(values: list[float], limit: float) -> str:
    within = [v <= limit for v in values]
    return "**met**" if all(within) else "**not met**" if not any(within) else "mixed"


def build_goals(benchmarks: Path = BENCHMARKS, goals=GOALS) -> str:
    lines = ["| goal | limit | measured (record's row) | verdict | record | explained in |",
             "|---|---|---|---|---|---|"]
    for g in goals:
        path = Path(benchmarks) / g.record
        source = path.read_text() if path.suffix == ".txt" else read_records(path)
        measured = g.measure(source)
        if not measured:
            raise ValueError(f"{g.record} has no row measuring: {g.what}")
        cells = ", ".join(f"{v:.{g.decimals}f}{g.unit} ({when[:16]})" for v, when in measured)
        lines.append(f"| {g.what} | ≤ {g.limit:g}{g.unit} | {cells} | "
                     f"{verdict([v for v, _ in measured], g.limit)} | "
                     f"`docs/benchmarks/{g.record}` | {g.where} |")
    return ("# Performance goals, from their records\n\n"
            "Generated by `python -m experiments.goals` from the records under "
            "docs/benchmarks/ (which rows measure each goal: experiments/goals.py); "
            "`python -m experiments.docs_check` checks this file and the README's copy.\n\n"
            + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "goals.md")
    args = parser.parse_args(argv)
    text = build_goals()
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
