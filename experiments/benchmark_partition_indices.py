"""Benchmark: every partition's row indices, one flwr-datasets ``load_partition`` each
against the partitioner's own assignment read at once (``partitions.federated
.partition_indices``' fast path), alternating, in one process.

    python -m experiments.benchmark_partition_indices            # IID at 10,000, Dirichlet at 1,000

Appends one JSON line per pair to docs/benchmarks/partition_indices.jsonl. Each pair is
checked equal, partition by partition, before it is timed into the record.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime

import numpy as np

from deploy.launch import REPO

OUT = REPO / "docs" / "benchmarks" / "partition_indices.jsonl"


def main() -> int:
    from fl_app.config import RunConfig, default_run_config
    from partitions.federated import INDEX_KEY, _assigned_positions, _column, _partitioner

    for name, n in (("iid", 10000), ("dirichlet", 1000)):
        cfg = RunConfig.from_mapping({**default_run_config(), "dataset": "fashion-mnist",
                                      "partitioner": name, "alpha": 0.5}).data
        _, partitioner = _partitioner(cfg, n)
        partitioner.load_partition(0)  # both sides start from a drawn assignment
        for rep in range(2):
            start = time.perf_counter()
            each = [_column(partitioner.load_partition(pid), INDEX_KEY) for pid in range(n)]
            each_s = time.perf_counter() - start
            start = time.perf_counter()
            column = partitioner.dataset.with_format("arrow")[INDEX_KEY].to_numpy()
            at_once = [column[rows] for rows in _assigned_positions(partitioner, n)]
            at_once_s = time.perf_counter() - start
            assert all(np.array_equal(a, b) for a, b in zip(each, at_once))
            row = {"date": datetime.now().isoformat(timespec="seconds"), "partitioner": name,
                   "partitions": n, "dataset": "fashion-mnist", "repeat": rep,
                   "load_partition_each_s": round(each_s, 4), "read_at_once_s": round(at_once_s, 4),
                   "ratio": round(each_s / at_once_s, 1), "load": os.getloadavg()[0]}
            print(json.dumps(row))
            with OUT.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
