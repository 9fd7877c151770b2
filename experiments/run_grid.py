"""Run a named grid of run configs in ONE `flwr run` (a sweep), then tabulate and plot it.

    python -m experiments.run_grid smoke                 # run what is missing, then report
    python -m experiments.run_grid baselines-digits --seeds 0 1
    python -m experiments.run_grid baselines-digits --report-only
    python -m experiments.run_grid --list

All pending runs of the grid go into one sweep file that a single `flwr run` executes
one after another on the same simulated nodes, so SuperLink, Ray and actor start-up and
data loading are paid once, not per run. Finished runs (``summary.json`` complete) are
skipped, so an interrupted grid is completed by running the same command again.
Outputs: ``docs/results/<grid>/`` (table.md, table.csv, curves.png, flwr.log) and
``docs/results/<grid>/runs/<run-name>/`` (summary.json, config.json; weights and per-run
plots stay local, see .gitignore).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fl_app.results import COMPLETED, is_complete, run_status

from .grids import GRIDS
from deploy.launch import REPO, LocalSuperLink
from .report import PairingError, write_report

DEFAULT_OUT = REPO / "docs" / "results"


def recorded_by_other_code(runs_dir: Path, runs: list[dict]) -> dict[str, str]:
    """The finished runs of ``runs`` whose recorded config has other keys than this code
    records for the same run: they come from another code version, so the report will not
    pair them with the runs about to be added (experiments/report.py, ``check_pairing``).
    Maps run name to what differs. A run whose config this code refuses is listed too.
    Only the keys are compared: a change of behaviour that records the same keys is not
    seen here (the report's round-0/round-1 checks see some of those)."""
    from fl_app.config import RunConfig, default_run_config

    defaults = default_run_config()
    other: dict[str, str] = {}
    for run in runs:
        try:
            summary = json.loads((runs_dir / run["run-name"] / "summary.json").read_text())
        except (OSError, ValueError):
            continue
        if not summary.get("complete"):
            continue
        recorded = set(summary.get("config", {}))
        try:
            expected = set(RunConfig.from_mapping({**defaults, **run}).resolved())
        except Exception as error:  # noqa: BLE001 (any refusal means: not this code's run)
            other[run["run-name"]] = f"this code refuses its config ({error})"
            continue
        missing, extra = sorted(expected - recorded), sorted(recorded - expected)
        parts = [f"{what} {len(keys)} key(s) ({_some(keys)})"
                 for what, keys in (("lacks", missing), ("has another", extra)) if keys]
        if parts:
            other[run["run-name"]] = "; ".join(parts)
    return other


def _some(keys: list[str], shown: int = 4) -> str:
    return ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", nargs="?", help="grid name (see --list)")
    parser.add_argument("--seeds", type=int, nargs="+", help="subset of the grid's seeds")
    parser.add_argument("--only", nargs="+", metavar="LABEL",
                        help="subset of the grid's strategy labels (e.g. fedavg-logreg)")
    parser.add_argument("--splits", nargs="+", metavar="SPLIT",
                        help="subset of the grid's splits (e.g. path2 dir0.5)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="root of grid outputs")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the tables and plots")
    parser.add_argument("--list", action="store_true", help="list the grids")
    parser.add_argument("--timeout", type=float, default=24 * 3600, help="seconds for the whole sweep")
    args = parser.parse_args(argv)

    if args.list or not args.grid:
        for name, grid in GRIDS.items():
            print(f"{name:24s} {len(grid.runs()):3d} runs  {grid.description}")
        return 0
    if args.grid not in GRIDS:
        parser.error(f"unknown grid {args.grid!r}; known: {sorted(GRIDS)}")
    grid = GRIDS[args.grid]
    # Absolute: the sweep file is read by the ServerApp, which runs from the installed FAB, not here.
    out_dir = args.out.resolve() / grid.name
    runs_dir = out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)

    if not args.report_only:
        runs = grid.runs(tuple(args.seeds) if args.seeds else None)
        if args.only:
            unknown = sorted(set(args.only) - set(grid.strategies))
            if unknown:
                parser.error(f"unknown label(s) {unknown}; grid {grid.name} has {sorted(grid.strategies)}")
            runs = [r for r in runs if grid.parse_run_name(r["run-name"])[0] in args.only]
        if args.splits:
            unknown = sorted(set(args.splits) - set(grid.splits))
            if unknown:
                parser.error(f"unknown split(s) {unknown}; grid {grid.name} has {list(grid.splits)}")
            runs = [r for r in runs if grid.parse_run_name(r["run-name"])[1] in args.splits]
        pending = [r for r in runs if not is_complete(runs_dir / r["run-name"])]
        other = recorded_by_other_code(runs_dir, runs) if pending else {}
        if other:
            print(f"WARNING: {len(other)} finished run(s) of grid {grid.name} were recorded by "
                  "other code; the report will refuse to pair them with the runs added now. "
                  f"To rerun them, move them out of {runs_dir} (e.g. to ../superseded/):",
                  file=sys.stderr)
            for name, why in sorted(other.items()):
                print(f"  {name}: {why}", file=sys.stderr)
        print(f"grid {grid.name}: {len(runs) - len(pending)} of {len(runs)} runs complete, "
              f"{len(pending)} to run", flush=True)
        if pending:
            sweep = out_dir / "sweep.json"
            sweep.write_text(json.dumps(pending, indent=1))
            started = time.monotonic()
            with LocalSuperLink(out_dir, log_path=out_dir / "superlink.log") as link:
                proc = link.run({"sweep-file": str(sweep), "results-dir": str(runs_dir)},
                                num_supernodes=grid.num_supernodes, timeout=args.timeout,
                                output=out_dir / "flwr.log")
            done = sum(is_complete(runs_dir / r["run-name"]) for r in pending)
            print(f"sweep finished in {time.monotonic() - started:.0f}s (exit {proc.returncode}): "
                  f"{done} of {len(pending)} pending runs complete; log: {out_dir / 'flwr.log'}")
    try:
        rows = write_report(grid, out_dir)
    except PairingError as error:
        print(f"{error}\nThe tables are written without paired differences; table.md says "
              "why.", file=sys.stderr)
        rows = write_report(grid, out_dir, unpaired_ok=True)
    print((out_dir / "table.md").read_text())
    runs = grid.runs(tuple(args.seeds) if args.seeds else None)
    if args.only:
        runs = [r for r in runs if grid.parse_run_name(r["run-name"])[0] in args.only]
    bad = {r["run-name"]: run_status(runs_dir / r["run-name"]) for r in runs}
    bad = {name: status for name, status in bad.items() if status != COMPLETED}
    for name, status in sorted(bad.items()):
        print(f"NOT COMPLETED: {name}: {status or 'no summary'}", file=sys.stderr)
    return 0 if rows and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
