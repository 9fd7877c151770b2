"""Where a client message's time goes, in one process, for fl_app and the minimal app.

    python -m experiments.scale.profile_client                  # fedavg, 1000 nodes
    python -m experiments.scale.profile_client --strategy scaffold --rounds 3
    python -m experiments.scale.profile_client --profile out.pstats

No Flower runtime: the real ServerApp-side strategy objects (fl_app: ``Guarded`` around
the registry's strategy with a ``PartitionSampler``; minimal: Flower's ``FedAvg``) build
the real train/evaluate messages for N nodes; each message is pickled and unpickled with
its node's ``Context`` (what Ray does to ship them to an actor), handed to the real
``ClientApp`` object (``app(message, context)``, mods included), and the reply goes back
through pickle to the strategy's ``aggregate_*``. Each node keeps one Context (its state
persists, as in simulation), and each node's partition is seen for the first time in the
measured round (as in a 1000-node simulation, where a Ray actor rarely meets a partition
twice), after a warm-up on other partitions that loads the dataset and the split.

Reports per-message milliseconds of each phase, and with ``--profile`` the cProfile of the
client calls (top functions by cumulative time, per message).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pickle
import pstats
import statistics
import sys
import time
import tomllib
from pathlib import Path
from unittest.mock import Mock

REPO = Path(__file__).resolve().parents[2]
MINIMAL = Path(__file__).resolve().parent / "minimal_app"

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def app_defaults(pyproject: Path) -> dict:
    return dict(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])


def _grid(node_ids: list[int]) -> Mock:
    grid = Mock()
    grid.get_node_ids.return_value = list(node_ids)
    return grid


def _pin(messages: list, nodes: list[int] | None) -> list:
    """With ``nodes`` (a warm-up), only the first len(nodes) messages, sent to those nodes."""
    if nodes is None:
        return messages
    messages = messages[:len(nodes)]
    for message, node in zip(messages, nodes):
        message.metadata.dst_node_id = node
    return messages


class Harness:
    """A strategy + ClientApp pair driven round by round in this process."""

    name: str

    def __init__(self, nodes: int) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id = 1  # lets Message() be built outside a running app
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = 1
        self.nodes = nodes
        self.node_ids = list(range(1001, 1001 + nodes))  # partition = node id - 1001
        self.contexts: dict = {}
        self.timings: dict[str, list[float]] = {}

    def context(self, node_id: int):
        from flwr.app import Context, RecordDict

        if node_id not in self.contexts:
            self.contexts[node_id] = Context(
                run_id=1, node_id=node_id,
                node_config={"partition-id": node_id - 1001, "num-partitions": self.nodes},
                state=RecordDict(), run_config=dict(self.run_config))
        return self.contexts[node_id]

    def _note(self, key: str, seconds: float) -> None:
        self.timings.setdefault(key, []).append(seconds)

    def deliver(self, messages, profiler: cProfile.Profile | None, stage: str) -> list:
        """Ship each message to its node (pickle, as Ray does), run the ClientApp, ship back."""
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            t0 = time.perf_counter()
            wire_in = pickle.dumps((msg, self.context(node)), protocol=5)
            msg_in, ctx = pickle.loads(wire_in)
            t1 = time.perf_counter()
            if profiler:
                profiler.enable()
            reply = self.app(msg_in, ctx)
            if profiler:
                profiler.disable()
            t2 = time.perf_counter()
            wire_out = pickle.dumps((reply, ctx), protocol=5)
            reply, ctx = pickle.loads(wire_out)
            self.contexts[node] = ctx
            t3 = time.perf_counter()
            self._note(f"{stage}.client_call", t2 - t1)
            self._note(f"{stage}.pickle_roundtrip", (t1 - t0) + (t3 - t2))
            self._note(f"{stage}.bytes_in", len(wire_in))
            self._note(f"{stage}.bytes_out", len(wire_out))
            if reply.has_error():
                raise RuntimeError(f"{self.name}: node {node} replied with an error: {reply.error.reason}")
            replies.append(reply)
        return replies

    def round(self, server_round: int, profiler=None, warmup_nodes: list[int] | None = None) -> None:
        grid = _grid(self.node_ids)
        t0 = time.perf_counter()
        messages = _pin(list(self.strategy.configure_train(server_round, self.arrays,
                                                           self.train_config(), grid)), warmup_nodes)
        t1 = time.perf_counter()
        replies = self.deliver(messages, profiler, "train")
        t2 = time.perf_counter()
        arrays, _ = self.strategy.aggregate_train(server_round, replies)
        t3 = time.perf_counter()
        if arrays is not None and warmup_nodes is None:
            self.arrays = arrays
        ev = _pin(list(self.strategy.configure_evaluate(server_round, self.arrays,
                                                        self.evaluate_config(), grid)), warmup_nodes)
        t4 = time.perf_counter()
        ereplies = self.deliver(ev, profiler, "evaluate")
        t5 = time.perf_counter()
        self.strategy.aggregate_evaluate(server_round, ereplies)
        t6 = time.perf_counter()
        self.central_eval()
        t7 = time.perf_counter()
        if warmup_nodes is None:
            self._note("server.configure_train", t1 - t0)
            self._note("server.aggregate_train", t3 - t2)
            self._note("server.configure_evaluate", t4 - t3)
            self._note("server.aggregate_evaluate", t6 - t5)
            self._note("server.central_eval", t7 - t6)
            self._note("round.train_messages", len(messages))
            self._note("round.evaluate_messages", len(ev))


class FlAppHarness(Harness):
    def __init__(self, nodes: int, strategy: str, overrides: dict) -> None:
        super().__init__(nodes)
        self.name = f"fl_app/{strategy}"
        sys.path.insert(0, str(REPO))
        import strategies
        from flwr.app import ArrayRecord, ConfigRecord
        from fl_common import wire
        from fl_app.client_app import app
        from fl_app.config import RunConfig
        from fl_app.model import build_model
        from fl_app.server_app import INIT_SEED_TAG
        from fl_app.training import evaluate
        from fl_common.randomness import derive_seed
        from partitions import check_partitions, dataset_info, load_test_data, train_sizes
        from strategies.guard import ExampleLimits, Guarded
        from strategies.sampling import PartitionSampler

        self.app = app
        self.run_config = {**app_defaults(REPO / "pyproject.toml"), **overrides, "strategy": strategy}
        cfg = RunConfig.from_mapping(self.run_config)
        info = dataset_info(cfg.dataset)
        sizes = check_partitions(cfg.data, nodes)
        train_n = train_sizes(sizes, float(cfg.validation_fraction))
        self.model = build_model(info, seed=derive_seed(cfg.seed, INIT_SEED_TAG), kind=cfg.model)
        self.arrays = ArrayRecord(self.model.state_dict())
        self.test = load_test_data(cfg.dataset)
        self._evaluate = evaluate
        limits = ExampleLimits(default=cfg.max_num_examples,
                               train=dict(enumerate(train_n)),
                               evaluate={p: s - n for p, (s, n) in enumerate(zip(sizes, train_n))})
        sampler = PartitionSampler(cfg.seed, lambda ids: {n: n - 1001 for n in ids})
        inner = strategies.build(cfg, nodes, total_examples=sum(train_n))
        self.strategy = Guarded(inner, sampler=sampler, min_valid_replies=cfg.min_train_nodes,
                                example_limits=limits)

        def config() -> ConfigRecord:
            return ConfigRecord({wire.RUN_CONFIG: cfg.to_json(), wire.RUN_TAG: "profile",
                                 wire.IMAGE_SHAPE: [int(v) for v in info.image_shape],
                                 wire.NUM_CLASSES: int(info.num_classes)})

        self.train_config = self.evaluate_config = config

    def central_eval(self) -> None:
        self.model.load_state_dict(self.arrays.to_torch_state_dict())
        self._evaluate(self.model, self.test)


class MinimalHarness(Harness):
    def __init__(self, nodes: int, overrides: dict, central: bool) -> None:
        super().__init__(nodes)
        self.name = "minimal"
        sys.path.insert(0, str(MINIMAL))
        import torch
        from flwr.app import ArrayRecord, ConfigRecord
        from flwr.serverapp.strategy import FedAvg
        from minimal_fl.client_app import app
        from minimal_fl.task import Net, test

        self.app = app
        defaults = app_defaults(MINIMAL / "pyproject.toml")
        self.run_config = {**defaults, **{k: v for k, v in overrides.items() if k in defaults}}
        torch.manual_seed(0)
        self.model = Net()
        self.arrays = ArrayRecord(self.model.state_dict())
        self._test = test
        self.central = central
        if central:
            from partitions import load_test_data

            self.test = load_test_data(self.run_config["dataset"])
        self.strategy = FedAvg(fraction_train=float(self.run_config["fraction-train"]),
                               fraction_evaluate=float(self.run_config["fraction-evaluate"]),
                               min_train_nodes=2, min_evaluate_nodes=1, min_available_nodes=2)
        lr = float(self.run_config["lr"])
        self.train_config = lambda: ConfigRecord({"lr": lr})
        self.evaluate_config = lambda: ConfigRecord()

    def central_eval(self) -> None:
        if self.central:
            self.model.load_state_dict(self.arrays.to_torch_state_dict())
            self._test(self.model, self.test.x, self.test.y)


def check_same_data(nodes: int, overrides: dict) -> bool:
    """The minimal app's partition arrays equal partitions.load_client_data's."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(MINIMAL))
    from fl_app.config import RunConfig
    from minimal_fl.task import client_data
    from partitions import load_client_data

    rc_min = {**app_defaults(MINIMAL / "pyproject.toml"),
              **{k: v for k, v in overrides.items() if k in app_defaults(MINIMAL / "pyproject.toml")}}
    cfg = RunConfig.from_mapping({**app_defaults(REPO / "pyproject.toml"), **overrides})
    for pid in (0, nodes // 2, nodes - 1):
        a, b = load_client_data(cfg.data, pid, nodes), client_data(rc_min, pid, nodes)
        for x, y in ((a.train.x, b.train.x), (a.train.y, b.train.y), (a.val.x, b.val.x)):
            if x.shape != y.shape or not np.array_equal(x, y):
                return False
    return True


def summarize(h: Harness) -> dict:
    out = {}
    for key, values in sorted(h.timings.items()):
        if key.endswith("bytes_in") or key.endswith("bytes_out") or key.startswith("round."):
            out[key] = statistics.median(values)
        elif key.startswith("server."):
            out[key + "_ms"] = 1000 * statistics.median(values)
        else:
            out[key + "_ms"] = 1000 * statistics.median(values)
            out[key + "_mean_ms"] = 1000 * statistics.mean(values)
    return out


def top_functions(profiler: cProfile.Profile, calls: int, limit: int) -> str:
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("cumulative").print_stats(limit)
    text = stream.getvalue()
    return text + f"\n(divide cumtime by {calls} client calls for per-message seconds)\n"


def run(args) -> dict:
    overrides = {"dataset": args.dataset, "partitioner": "iid", "fraction-train": args.fraction,
                 "fraction-evaluate": args.fraction, "num-server-rounds": args.rounds + 1}
    results: dict = {"nodes": args.nodes, "strategy": args.strategy, "dataset": args.dataset}
    import torch

    torch.set_num_threads(1)  # as a Ray actor with num-cpus=1 (OMP_NUM_THREADS=1)
    results["same_partitions"] = check_same_data(args.nodes, overrides)
    harnesses = [MinimalHarness(args.nodes, overrides, central=True),
                 FlAppHarness(args.nodes, args.strategy, overrides)]
    for h in harnesses:
        # Warm-up: load the dataset and compute the split, on nodes never measured later.
        warm = h.node_ids[-3:]
        h.round(1, warmup_nodes=warm)
        h.timings.clear()
        profiler = cProfile.Profile() if args.profile else None
        for r in range(1, args.rounds + 1):
            h.round(r, profiler=profiler if r == args.rounds else None)
        results[h.name] = summarize(h)
        if profiler:
            calls = int(h.timings["round.train_messages"][-1] + h.timings["round.evaluate_messages"][-1])
            text = top_functions(profiler, calls, args.top)
            path = Path(f"{args.profile}.{h.name.replace('/', '_')}.txt")
            path.write_text(text)
            profiler.dump_stats(f"{args.profile}.{h.name.replace('/', '_')}.pstats")
            results[h.name]["profile"] = str(path)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--strategy", default="fedavg")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=2, help="measured rounds (after a warm-up)")
    p.add_argument("--profile", default="", help="path prefix for cProfile output (last round)")
    p.add_argument("--top", type=int, default=45)
    args = p.parse_args(argv)
    print(json.dumps(run(args), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
