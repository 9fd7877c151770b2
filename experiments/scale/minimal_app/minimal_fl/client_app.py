"""Minimal ClientApp: @app.train / @app.evaluate, nothing else."""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .task import Net, client_data, test, train

app = ClientApp()


def _model(msg: Message) -> Net:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    rc = context.run_config
    pid, num = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    data = client_data(rc, pid, num)
    model = _model(msg)
    started = time.perf_counter()
    loss, steps = train(model, data.train.x, data.train.y, int(rc["local-epochs"]),
                        int(rc["batch-size"]), float(rc["lr"]), float(rc["momentum"]),
                        seed=int(msg.content["config"]["server-round"]) * 100003 + pid)
    seconds = time.perf_counter() - started
    metrics = MetricRecord({"train-loss": loss, "num-examples": len(data.train),
                            "local-steps": steps, "local-seconds": seconds,
                            "torch-threads": torch.get_num_threads()})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}),
                   reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    rc = context.run_config
    pid, num = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    data = client_data(rc, pid, num)
    loss, acc = test(_model(msg), data.val.x, data.val.y)
    metrics = MetricRecord({"val-loss": loss, "val-accuracy": acc, "num-examples": len(data.val)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
