"""What building the app's FAB costs every ``flwr run``: from the app's folder, and from its copy.

    python -m experiments.benchmark_fab_build            # 5 alternating pairs
    python -m experiments.benchmark_fab_build --app DIR  # another app folder

``flwr run <folder>`` builds the FAB with ``build_fab_from_disk(folder)`` before it
submits anything (flwr/cli/run/run.py). This times that call on the app's own folder
(Flower lists every file under it, ``.venv`` included, then filters) against
``deploy/app_copy.copy_app`` followed by the same call on the copy (what
``deploy.launch.LocalSuperLink.run`` hands ``flwr run``), alternating the two in one run,
and checks that both give the same FAB. Appends one row to docs/benchmarks/fab_build.jsonl.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.cli.utils import collect_files

from deploy.app_copy import app_files, copy_app, fab_paths
from deploy.launch import REPO
from experiments.records import append_record

OUT = REPO / "docs" / "benchmarks" / "fab_build.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", type=Path, default=REPO)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    app = args.app.resolve()
    flower, copied = [], []
    with tempfile.TemporaryDirectory(prefix="fab-build-") as tmp:
        for i in range(args.pairs):
            for side in (("flower", "copy") if i % 2 == 0 else ("copy", "flower")):
                start = time.perf_counter()
                if side == "flower":
                    fab = build_fab_from_disk(app)
                    flower.append(time.perf_counter() - start)
                    reference = fab
                else:
                    fab = build_fab_from_disk(copy_app(app, Path(tmp) / f"app-{i}"))
                    copied.append(time.perf_counter() - start)
            if fab != reference:
                raise RuntimeError("the copy's FAB differs from Flower's build of the folder")
    append_record(args.out, args.label, os.cpu_count(), {
        "app": str(app), "files_flower_lists": len(collect_files(app)),
        "files_copy_lists": len(app_files(app)), "files_in_fab": len(fab_paths(app)),
        "pairs": args.pairs, "flower_build_s": flower, "copy_and_build_s": copied,
        "median_flower_build_s": statistics.median(flower),
        "median_copy_and_build_s": statistics.median(copied),
        "ratio_of_medians": statistics.median(flower) / statistics.median(copied)},
        shown=lambda key: not key.endswith("build_s"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
