"""The training loop in a fresh process, as a deployed ClientApp runs it: threads and cold start.

    python -m experiments.benchmark_threads                     # digits, 2 concurrent processes
    python -m experiments.benchmark_threads --dataset fashion-mnist --samples 27000

Each trial starts ``--procs`` fresh Python processes at once (as ``--procs`` SuperNodes on
one machine each start a ClientApp for a round's train message), each loads its
partition, builds the model and runs ``train_local`` twice (one epoch each, the second
the warm loop a long-lived process would run), with PyTorch's intra-op threads left at
its default (all cores) or set by ``fl_app.node_runtime.apply_threads``. Variants
alternate within the invocation (``--repeat`` times). Appends one row per variant (medians
over trials and processes) to docs/benchmarks/deployment_threads.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "deployment_threads.jsonl"
REPO = Path(__file__).resolve().parent.parent

CHILD = r'''
import json, sys, time
t0 = time.perf_counter()
import torch
from fl_app.model import build_model
from fl_app.training import train_local
from partitions import DataConfig, load_client_data, dataset_info
t_import = time.perf_counter() - t0
threads, dataset, pid, procs, samples = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if threads != "default":
    from fl_app.node_runtime import apply_threads
    apply_threads(int(threads))
cfg = DataConfig(dataset, "iid", 0.5, 2, 2, 0.1, 0)
t = time.perf_counter()
data = load_client_data(cfg, pid, procs)
train = data.train
if samples and len(train.y) > samples:
    from partitions import ImageArrays
    train = ImageArrays(train.x[:samples], train.y[:samples])
t_data = time.perf_counter() - t
info = dataset_info(dataset)
model = build_model(info, seed=0)
loops = []
for i in range(2):
    t = time.perf_counter()
    train_local(model, train, epochs=1, batch_size=32, lr=0.05, seed=i)
    loops.append(time.perf_counter() - t)
print(json.dumps({"threads": torch.get_num_threads(), "import_s": t_import, "data_s": t_data,
                  "first_loop_s": loops[0], "second_loop_s": loops[1], "n": len(train.y)}))
'''


def trial(threads: str, args) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, threads, args.dataset, str(pid),
                               str(args.procs), str(args.samples)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO),
                                   "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
             for pid in range(args.procs)]
    out = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"child failed ({proc.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=0, help="cap on training samples (0: all)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variants", default="default,1", help="comma-separated thread counts")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeat):
        for variant in variants:
            results[variant] += trial(variant, args)
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with OUT.open("a") as handle:
        for variant, rows in results.items():
            row = {"when": when, "machine": platform.node(), "cores": os.cpu_count(),
                   "affinity": len(os.sched_getaffinity(0)), "dataset": args.dataset,
                   "procs": args.procs, "samples": rows[0]["n"], "threads_setting": variant,
                   "torch_threads": rows[0]["threads"], "trials": args.repeat,
                   **{k: statistics.median(r[k] for r in rows)
                      for k in ("import_s", "data_s", "first_loop_s", "second_loop_s")},
                   "load_average": os.getloadavg()}
            print(json.dumps(row))
            handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
