"""Krum aggregation time: ours (float64 update distances) against Flower's ``Krum``.

    python -m experiments.benchmark_krum                # n = 10, 50, 100; d = 100k, 1M
    python -m experiments.benchmark_krum --n 10 50 --d 100000

For each (n, d) both strategies aggregate the same n random float32 replies of a
d-parameter model (f = (n - 3) // 2, the most n allows), best of ``--repeat`` runs each,
interleaved. The machine is shared and noisy: read the ratio, not the seconds. Results
are appended to docs/benchmarks/krum.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import Krum as FlowerKrum

from strategies.krum import Krum

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "krum.jsonl"


class _Reply:
    """The part of a Message a strategy's aggregate_train reads."""

    def __init__(self, content: RecordDict, node_id: int) -> None:
        self.content = content
        self.metadata = type("Metadata", (), {"src_node_id": node_id})()

    def has_error(self) -> bool:
        return False


def _time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def bench(n: int, d: int, repeat: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=d).astype(np.float32)
    replies = []
    for i in range(n):
        record = ArrayRecord({"w": Array(x + rng.normal(scale=0.01, size=d).astype(np.float32))})
        content = RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 10})})
        replies.append(_Reply(content, i + 1))
    f = (n - 3) // 2
    ours = Krum(num_malicious=f, min_train_nodes=1, min_available_nodes=1)
    ours.x = {"w": x}  # what configure_train records
    theirs = FlowerKrum(num_malicious_nodes=f, min_train_nodes=1, min_available_nodes=1)
    t_ours, t_theirs = float("inf"), float("inf")
    for _ in range(repeat):  # interleaved
        t_ours = min(t_ours, _time(lambda: ours.aggregate_train(1, replies), 1))
        t_theirs = min(t_theirs, _time(lambda: theirs.aggregate_train(1, replies), 1))
    return {"n": n, "d": d, "f": f, "ours_s": t_ours, "flower_s": t_theirs,
            "ratio": t_ours / t_theirs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--d", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for d in args.d:
        for n in args.n:
            row = {"when": stamp, "machine": platform.node(), **bench(n, d, args.repeat)}
            print(f"n={n:4d} d={d:8d} f={row['f']:3d}  ours {row['ours_s']:.3f}s  "
                  f"flower {row['flower_s']:.3f}s  ratio {row['ratio']:.2f}", flush=True)
            with OUT.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
