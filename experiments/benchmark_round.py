"""Benchmark: a warm simulated Flower round against the compute floor, in one invocation.

    python -m experiments.benchmark_round                 # 10 clients, Fashion-MNIST IID
    python -m experiments.benchmark_round --clients 4 --dataset digits --rounds 3
    python -m experiments.benchmark_round --sweep-check   # also: sweep vs separate runs
    python -m experiments.benchmark_round --strategies fedavg fedprox scaffold fedadam

Floor: the same N local trainings (same partitions, same training function, same
hyperparameters) in plain PyTorch, spread over P worker processes of one thread each
(P = the machine's cores), data loaded before the clock starts; the floor is the slowest
worker's training time. Flower: ``flwr run`` in simulation, one ClientApp actor per core
(``client-resources-num-cpus=1``), R rounds; a warm round is any round after the first
(the first pays Ray's and the actors' start-up and the data loading). We compare the
training phase of a warm round (configure, client training, replies, aggregation) with
the floor, and report the whole round (with federated and centralized evaluation), and
the fixed cost of the whole ``flwr run`` (total wall time minus R warm rounds).
With ``--strategies``, each strategy's warm training phase is divided by FedAvg's, all
in one sweep (two passes in alternating order, to spread drift in machine load).

The machine is shared and noisy: read the ratio, not the seconds. Results are appended
to docs/benchmarks/round_overhead.jsonl.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

from deploy.launch import REPO, LocalSuperLink

OUT = REPO / "docs" / "benchmarks" / "round_overhead.jsonl"


def _worker(partition_ids, cfg_kwargs, num_partitions, hyper, barrier, queue) -> None:
    import torch

    torch.set_num_threads(1)
    from fl_app.model import build_model
    from fl_app.training import train_local
    from fl_common.randomness import derive_seed
    from partitions import DataConfig, dataset_info, load_client_data

    cfg = DataConfig(**cfg_kwargs)
    info = dataset_info(cfg.dataset)
    data = {pid: load_client_data(cfg, pid, num_partitions).train for pid in partition_ids}
    models = {pid: build_model(info, seed=0) for pid in partition_ids}
    # Warm up (first convolutions allocate and pick kernels), as a Flower actor is warm
    # after its first round.
    warm = data[partition_ids[0]]
    train_local(build_model(info, seed=1), type(warm)(warm.x[:256], warm.y[:256]), epochs=1,
                batch_size=hyper["batch-size"], lr=hyper["lr"], momentum=hyper["momentum"])
    barrier.wait()
    start = time.perf_counter()
    for pid in partition_ids:
        train_local(models[pid], data[pid], epochs=hyper["local-epochs"],
                    batch_size=hyper["batch-size"], lr=hyper["lr"], momentum=hyper["momentum"],
                    seed=derive_seed(0, 2, pid))
    queue.put(time.perf_counter() - start)


def compute_floor(dataset: str, clients: int, workers: int, hyper: dict) -> float:
    """Seconds for the slowest of ``workers`` one-thread processes to train its clients."""
    cfg_kwargs = dict(dataset=dataset, partitioner="iid", alpha=0.5, classes_per_partition=2,
                      shards_per_partition=2, validation_fraction=hyper["validation-fraction"],
                      seed=0)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    groups = [list(range(clients))[w::workers] for w in range(workers)]
    procs = [ctx.Process(target=_worker, args=(g, cfg_kwargs, clients, hyper, barrier, queue))
             for g in groups]
    for p in procs:
        p.start()
    times = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return max(times)


def flower_run(link: LocalSuperLink, overrides: dict, clients: int, num_cpus: float,
               results: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    proc = link.run({**overrides, "results-dir": str(results)}, num_supernodes=clients,
                    num_cpus=num_cpus)
    total = time.perf_counter() - started
    summary_path = results / overrides["run-name"] / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"flwr run produced no summary:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    return total, json.loads(summary_path.read_text())


def strategy_costs(link: LocalSuperLink, base: dict, args, results: Path) -> dict[str, float]:
    """Median warm training-phase seconds of each strategy, divided by FedAvg's."""
    names = ["fedavg"] + [n for n in args.strategies if n != "fedavg"]
    order = names + names[::-1]
    configs = [{**base, "strategy": n, "num-server-rounds": args.rounds, "run-name": f"{n}-{i}"}
               for i, n in enumerate(order)]
    sweep_file = results.parent / "strategies.json"
    sweep_file.write_text(json.dumps(configs))
    link.run({"sweep-file": str(sweep_file), "results-dir": str(results)},
             num_supernodes=args.clients, num_cpus=args.num_cpus)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for cfg in configs:
        history = json.loads((results / cfg["run-name"] / "summary.json").read_text())["history"]
        seconds[cfg["strategy"]] += [r["train_seconds"] for r in history if r["round"] >= 2]
    medians = {n: statistics.median(v) for n, v in seconds.items()}
    ratios = {n: medians[n] / medians["fedavg"] for n in names}
    for n in names:
        print(f"strategy {n:10s}: warm training phase {medians[n]:.2f} s, {ratios[n]:.3f}x fedavg")
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=1, help="client-resources-num-cpus")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sweep-check", action="store_true",
                        help="also time 3 short configs as one sweep vs 3 separate flwr runs")
    parser.add_argument("--strategies", nargs="+", default=None,
                        help="also time these strategies' warm rounds against fedavg's")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    hyper = {"local-epochs": 1, "batch-size": 32, "lr": 0.05, "momentum": 0.9,
             "validation-fraction": 0.1}
    base = {"dataset": args.dataset, "partitioner": "iid", "strategy": "fedavg", **hyper}
    record: dict = {"date": datetime.now().isoformat(timespec="seconds"), "floor_warmed_up": True,
                    "clients": args.clients,
                    "dataset": args.dataset, "rounds": args.rounds, "num_cpus": args.num_cpus,
                    "workers": args.workers, "cores": os.cpu_count()}

    floor = compute_floor(args.dataset, args.clients, args.workers, hyper)
    record["floor_seconds"] = floor
    print(f"floor: {args.clients} local trainings on {args.workers} one-thread processes: {floor:.2f} s")

    with tempfile.TemporaryDirectory() as tmp, LocalSuperLink(Path(tmp)) as link:
        results = Path(tmp) / "results"
        total, summary = flower_run(link, {**base, "num-server-rounds": args.rounds,
                                           "run-name": "bench"}, args.clients, args.num_cpus, results)
        warm = [r for r in summary["history"] if r["round"] >= 2]
        train_phase = statistics.median(r["train_seconds"] for r in warm)
        whole_round = statistics.median(r["round_seconds"] for r in warm)
        record.update({
            "warm_train_phase_seconds": train_phase,
            "warm_round_seconds": whole_round,
            "first_round_seconds": summary["history"][1]["round_seconds"],
            "flwr_run_total_seconds": total,
            "fixed_cost_seconds": total - args.rounds * whole_round,
            "ratio_train_phase_vs_floor": train_phase / floor,
            "ratio_round_vs_floor": whole_round / floor,
        })
        print(f"flower: warm training phase {train_phase:.2f} s ({train_phase / floor:.3f}x floor); "
              f"whole warm round incl. evaluation {whole_round:.2f} s ({whole_round / floor:.3f}x); "
              f"first round {record['first_round_seconds']:.2f} s")
        print(f"flwr run: {total:.1f} s for {args.rounds} rounds; fixed cost "
              f"(start-up + teardown) {record['fixed_cost_seconds']:.1f} s")

        if args.sweep_check:
            configs = [{**base, "num-server-rounds": 2, "run-name": f"sweep-{i}", "seed": i}
                       for i in range(3)]
            sweep_file = Path(tmp) / "sweep.json"
            sweep_file.write_text(json.dumps(configs))
            started = time.perf_counter()
            link.run({"sweep-file": str(sweep_file), "results-dir": str(results / "sweep")},
                     num_supernodes=args.clients, num_cpus=args.num_cpus)
            sweep_total = time.perf_counter() - started
            separate_total = 0.0
            for cfg in configs:
                t, _ = flower_run(link, {**cfg, "run-name": cfg["run-name"] + "-alone"},
                                  args.clients, args.num_cpus, results / "separate")
                separate_total += t
            record.update({"sweep_3x2_rounds_seconds": sweep_total,
                           "separate_3x2_rounds_seconds": separate_total})
            print(f"3 configs x 2 rounds: one sweep {sweep_total:.1f} s, three flwr runs "
                  f"{separate_total:.1f} s ({separate_total / sweep_total:.2f}x)")

        if args.strategies:
            record["strategy_round_ratio"] = strategy_costs(link, base, args, results / "strategies")

    if not args.no_save:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        with OUT.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(f"appended to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
