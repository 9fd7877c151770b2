"""The redesign's guard: the default run and one run of every strategy, final accuracies.

    python -m experiments.redesign_check OUT.json [--label before|after]

One ``flwr run`` (a sweep on 10 simulated nodes, one CPU each): the default run config
(FedAvg, digits, IID, 10 rounds), then every strategy on digits, Dirichlet(0.5), seed 0,
5 rounds (``min-train-nodes`` 3, which the robust rules need with f = 0). Writes each
run's final test accuracy and loss, and the round-1 loss, to OUT.json. Run it on the
code before a refactoring and after it, on the same machine: the two files must agree
to the last digit (docs/strategies.md, "The redesign, checked").
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fl_app.results import is_complete

from deploy.launch import REPO, LocalSuperLink

STRATEGIES = ("fedavg", "fedprox", "scaffold", "fedadam", "fedavgm", "fedyogi", "fedadagrad",
              "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
SPLIT = {"dataset": "digits", "partitioner": "dirichlet", "alpha": 0.5, "seed": 0,
         "num-server-rounds": 5, "min-train-nodes": 3}


def sweep() -> list[dict]:
    return [{"run-name": "default"}] + [{"run-name": name, "strategy": name, **SPLIT}
                                         for name in STRATEGIES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--label", default="")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="redesign-check-") as tmp:
        work = Path(tmp)
        runs = work / "runs"
        (work / "sweep.json").write_text(json.dumps(sweep()))
        with LocalSuperLink(work, log_path=work / "superlink.log") as link:
            link.run({"sweep-file": str(work / "sweep.json"), "results-dir": str(runs)},
                     num_supernodes=10, timeout=3600, output=work / "flwr.log")
        table = {}
        for entry in sweep():
            folder = runs / entry["run-name"]
            if not is_complete(folder):
                table[entry["run-name"]] = None
                continue
            summary = json.loads((folder / "summary.json").read_text())
            history = summary["history"]
            table[entry["run-name"]] = {
                "final_test_accuracy": summary["final_test_accuracy"],
                "final_test_loss": history[-1]["test_loss"],
                "round1_test_loss": history[1]["test_loss"],
                "rounds": len(history) - 1,
            }
    args.out.write_text(json.dumps({"label": args.label, "repo": str(REPO), "runs": table},
                                   indent=1, sort_keys=True))
    print(json.dumps(table, indent=1))
    return 0 if all(table.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
