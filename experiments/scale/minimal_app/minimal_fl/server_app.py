"""Minimal ServerApp: Flower's built-in FedAvg and its start() loop.

Per round it appends one JSON line to run-config ``times-file``: perf_counter stamps of
configure_train, aggregate_train and the end of the round (evaluate_fn), so that the
benchmark can compute round and training-phase seconds exactly as fl_app records them.
"""

from __future__ import annotations

import json
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from .task import Net, test

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg, unchanged, that notes when its training phase starts and ends."""

    stamps: dict

    def configure_train(self, server_round, arrays, config, grid):
        self.stamps = {"round": server_round, "train_start": time.perf_counter()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        out = super().aggregate_train(server_round, replies)
        self.stamps["train_end"] = time.perf_counter()
        metrics = out[1]
        if metrics is not None and "local-seconds" in metrics:
            self.stamps["local_seconds"] = float(metrics["local-seconds"])
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    torch.manual_seed(int(rc["seed"]))
    model = Net()
    strategy = TimedFedAvg(fraction_train=float(rc["fraction-train"]),
                           fraction_evaluate=float(rc["fraction-evaluate"]),
                           min_train_nodes=2, min_evaluate_nodes=1, min_available_nodes=2)
    times_file = str(rc["times-file"])
    central = bool(rc["central-eval"])
    test_data = None
    if central:
        from partitions import load_test_data

        test_data = load_test_data(str(rc["dataset"]))
    clock = {"last": time.perf_counter()}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        out = None
        if test_data is not None:
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, acc = test(model, test_data.x, test_data.y)
            out = MetricRecord({"test-loss": loss, "test-accuracy": acc})
        now = time.perf_counter()
        if server_round > 0 and times_file:
            s = getattr(strategy, "stamps", {})
            record = {"round": server_round, "round_seconds": now - clock["last"],
                      "train_seconds": s.get("train_end", now) - s.get("train_start", now),
                      "local_seconds": s.get("local_seconds"),
                      "wall": time.time()}
            with open(times_file, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        clock["last"] = now
        return out

    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                   num_rounds=int(rc["num-server-rounds"]),
                   train_config=ConfigRecord({"lr": float(rc["lr"])}),
                   evaluate_fn=evaluate_fn)
