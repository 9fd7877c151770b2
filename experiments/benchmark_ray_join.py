"""A ``flwr run`` in simulation that starts its own Ray, against one that joins a running Ray.

    python -m experiments.benchmark_ray_join             # 2 alternating pairs
    python -m experiments.benchmark_ray_join --pairs 3

Flower's simulation calls ``ray.init()`` in every run: with no cluster to join it starts
Ray's head processes (GCS, raylet, ...) and stops them when the run ends; with
``RAY_ADDRESS`` it joins the cluster named there (deploy/ray_cluster.py). This times the
whole ``flwr run`` (deploy.launch.LocalSuperLink.run: FAB, Ray, actors, one round of
digits on 2 nodes) both ways, alternating in one invocation, against a one-node cluster
of this machine's cores started once. Appends one row to docs/benchmarks/ray_join.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from deploy.launch import REPO, LocalSuperLink
from deploy.ray_cluster import RayCluster
from experiments.records import append_record

OUT = REPO / "docs" / "benchmarks" / "ray_join.jsonl"
RUN = {"dataset": "digits", "num-server-rounds": 1, "run-name": "ray-join"}


def one_run(workdir: Path, env: dict[str, str]) -> float:
    link = LocalSuperLink(workdir, extra_env=env).start()
    try:
        start = time.perf_counter()
        proc = link.run({**RUN, "results-dir": str(workdir / "results")}, num_supernodes=2,
                        timeout=600)
        seconds = time.perf_counter() - start
    finally:
        link.stop()
    summary = workdir / "results" / RUN["run-name"] / "summary.json"
    if not summary.exists() or json.loads(summary.read_text())["status"] != "completed":
        raise RuntimeError(f"the run did not complete:\n{proc.stdout[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    seconds: dict[str, list[float]] = {"own_ray_s": [], "joined_ray_s": []}
    with tempfile.TemporaryDirectory(prefix="ray-join-") as tmp, \
            RayCluster(nodes=1, cpus_per_node=cores) as cluster:
        for i in range(args.pairs):
            order = ("own_ray_s", "joined_ray_s") if i % 2 == 0 else ("joined_ray_s", "own_ray_s")
            for side in order:
                env = {"RAY_ADDRESS": cluster.address} if side == "joined_ray_s" else {}
                seconds[side].append(one_run(Path(tmp) / f"{side}-{i}", env))
    own, joined = (statistics.median(seconds[k]) for k in ("own_ray_s", "joined_ray_s"))
    append_record(args.out, args.label, cores, {
        "run": RUN, "num_supernodes": 2, "pairs": args.pairs, **seconds,
        "median_own_ray_s": own, "median_joined_ray_s": joined, "saved_per_run_s": own - joined})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
