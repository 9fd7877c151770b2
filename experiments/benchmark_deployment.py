"""What a message costs on the deployment runtime against the simulation engine.

    python -m experiments.benchmark_deployment             # 2 nodes, 4 rounds, digits
    python -m experiments.benchmark_deployment --dataset fashion-mnist --rounds 3

The same run config twice, alternating: once in simulation (``flower-superlink
--simulation``: ClientApps in long-lived Ray actors), once on the deployment runtime (a
SuperLink and N ``flower-supernode`` processes; each message runs in a fresh ClientApp
process that imports PyTorch and loads its data again), and once more on the deployment
runtime with a ``cache-dir`` in every node's config (the partition is written once and
read back by later messages, instead of loading and splitting the dataset). Reported: the median over rounds
2.. of the training phase's seconds (``train_seconds``: send the train messages, the
clients train and reply) and of the clients' own training (``local_seconds``), and their
difference per message. Results are appended to docs/benchmarks/deployment.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from deploy.launch import LocalSuperLink

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "deployment.jsonl"


def one_run(mode: str, nodes: int, overrides: dict, workdir: Path) -> dict:
    name = f"{mode}-{datetime.now().strftime('%H%M%S%f')}"
    run = {**overrides, "run-name": name, "results-dir": str(workdir / "results"),
           "min-train-nodes": nodes, "fraction-train": 1.0}
    with LocalSuperLink(workdir / mode, simulation=(mode == "simulation")) as link:
        if mode.startswith("deployment"):
            for pid in range(nodes):
                cache = (f' cache-dir="{workdir / "cache"}"' if mode == "deployment-cache" else "")
                link.add_supernode(pid, nodes,
                                   node_config=f"partition-id={pid} num-partitions={nodes}{cache}")
            proc = link.run(run, timeout=3600)
        else:
            proc = link.run(run, num_supernodes=nodes, timeout=3600)
    path = workdir / "results" / name / "summary.json"
    if not path.exists():
        raise RuntimeError(f"{mode} run left no summary: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    rounds = json.loads(path.read_text())["history"][2:]
    return {"train_s": statistics.median(r["train_seconds"] for r in rounds),
            "local_s": statistics.median(r["local_seconds"] for r in rounds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    overrides = {"dataset": args.dataset, "num-server-rounds": args.rounds}
    modes = ("simulation", "deployment", "deployment-cache")
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        for _ in range(args.repeat):
            for mode in modes:
                results[mode].append(one_run(mode, args.nodes, overrides, Path(tmp)))
    best = {mode.replace("-", "_"): min(runs, key=lambda r: r["train_s"])
            for mode, runs in results.items()}
    # Each round of the training phase sends one message to each node, in parallel.
    extra = best["deployment"]["train_s"] - best["simulation"]["train_s"]
    row = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": platform.node(), "dataset": args.dataset, "nodes": args.nodes,
           "rounds": args.rounds, **{f"{m}_{k}": v for m, r in best.items() for k, v in r.items()},
           "deployment_over_simulation": best["deployment"]["train_s"] / best["simulation"]["train_s"],
           "deployment_cache_over_simulation": (best["deployment_cache"]["train_s"]
                                                / best["simulation"]["train_s"]),
           "extra_s_per_train_phase": extra, "load_average": os.getloadavg()}
    print(json.dumps(row, indent=1))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
