"""Local training only: the personalization floor a federated method must beat.

    python -m experiments.local_only fedper-digits        # every split and seed of the grid

For each split and seed of a grid, every client trains the run's seeded initial model on
its own training data alone, for as many epochs as the federated runs trained in total
(num-server-rounds x local-epochs, same batch size, lr and momentum), and scores it on its
own held-out data: the same partitions, validation split and initial model as the grid's
runs (same run config, same code paths: partitions.load_client_data, fl_app.training).
Writes ``docs/results/<grid>/local-only.json``: per split and seed the example-weighted
mean accuracy over clients (what ``val_accuracy`` is in the runs) and the spread across
clients; finished cells are skipped, so the command can be re-run after an interruption.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from experiments.grids import GRIDS
from fl_app.config import RunConfig, default_run_config
from fl_app.model import INIT_SEED_TAG, build_model
from fl_app.training import evaluate, train_local
from fl_common.atomic import write_atomic
from fl_common.randomness import derive_seed
from partitions import dataset_info, load_client_data

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
LOCAL_TAG = 0x10C


def local_only(cfg: RunConfig, num_clients: int) -> dict:
    info = dataset_info(cfg.dataset)
    accuracies, sizes = [], []
    for pid in range(num_clients):
        data = load_client_data(cfg.data, pid, num_clients)
        model = build_model(info, seed=derive_seed(cfg.seed, INIT_SEED_TAG), kind=cfg.model)
        train_local(model, data.train, epochs=cfg.num_server_rounds * cfg.local_epochs,
                    batch_size=cfg.batch_size, lr=float(cfg.lr), momentum=float(cfg.momentum),
                    seed=derive_seed(cfg.seed, LOCAL_TAG, pid))
        accuracies.append(evaluate(model, data.val)[1])
        sizes.append(len(data.val))
    weights = np.asarray(sizes, float) / sum(sizes)
    mean = float(np.dot(weights, accuracies))
    return {"val_accuracy": mean,
            "val_accuracy_std": float(np.sqrt(max(0.0, np.dot(weights, np.square(accuracies)) - mean ** 2))),
            "clients": num_clients, "per_client": accuracies, "epochs": cfg.num_server_rounds * cfg.local_epochs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", choices=sorted(GRIDS))
    parser.add_argument("--seeds", type=int, nargs="+", help="subset of the grid's seeds")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    grid = GRIDS[args.grid]
    out = RESULTS / grid.name / "local-only.json"
    done = json.loads(out.read_text()) if out.exists() else {}
    first = next(iter(grid.strategies))
    for run in grid.runs(tuple(args.seeds) if args.seeds else None):
        label, split, seed = grid.parse_run_name(run["run-name"])
        key = f"{split}__s{seed}"
        if label != first or key in done:
            continue
        cfg = RunConfig.from_mapping({**default_run_config(), **run, "strategy": "fedavg"})
        done[key] = local_only(cfg, grid.num_supernodes)
        print(f"{grid.name} {key}: local only {done[key]['val_accuracy']:.4f} "
              f"± {done[key]['val_accuracy_std']:.4f}", flush=True)
        text = (json.dumps(done, indent=1, sort_keys=True) + "\n").encode()
        write_atomic(out, lambda handle: handle.write(text))  # a kill keeps the cells done
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
