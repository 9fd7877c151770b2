"""Per-message costs of the app's parts, one at a time, against what a minimal app pays.

    python -m experiments.scale.components                 # 1000 partitions, Fashion-MNIST
    python -m experiments.scale.components --nodes 10000

Each item is timed on K distinct partitions (first use in this process, as in a
1000-node simulation where an actor rarely meets a partition twice), median of K, in
milliseconds, one torch thread. Read-only: it imports the app and calls its functions;
the "alternative" rows time what a proposed change would do instead, with the same
inputs, and check that the result is identical.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def timed(fn, inputs) -> tuple[float, list]:
    out, times = [], []
    for x in inputs:
        t = time.perf_counter()
        out.append(fn(x))
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--k", type=int, default=60)
    p.add_argument("--dataset", default="fashion-mnist")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    torch.set_num_threads(1)
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1

    import strategies
    from fl_app.config import RunConfig
    from fl_app.model import build_model
    from fl_app.training import evaluate
    from fl_common.randomness import derive_seed
    from partitions import ImageArrays, dataset_info, load_client_data, load_test_data, train_val_split
    from partitions.federated import INDEX_KEY, _partitioner
    from strategies.guard import ExampleLimits, Guarded
    from strategies.sampling import PartitionSampler

    import tomllib
    defaults = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    rows: dict[str, float] = {}
    n = args.nodes
    for strategy in ("fedavg", "scaffold"):
        cfg = RunConfig.from_mapping({**defaults, "dataset": args.dataset, "partitioner": "iid",
                                      "fraction-train": 0.1, "fraction-evaluate": 0.1,
                                      "strategy": strategy})
        if strategy == "fedavg":
            info = dataset_info(cfg.dataset)
            load_client_data(cfg.data, n - 1, n)  # loads the source and builds the split once
            pids = list(range(args.k))
            # --- client: data
            rows["client.load_client_data (lru miss)"], datas = timed(
                lambda pid: load_client_data(cfg.data, pid, n), pids)
            source, partitioner = _partitioner(cfg.data, n)
            rows["  of which partitioner.load_partition"], parts = timed(
                lambda pid: partitioner.load_partition(pid), pids)
            rows["  of which np.asarray(part['index']) (row iteration)"], _ = timed(
                lambda part: np.asarray(part[INDEX_KEY], dtype=np.int64), parts)
            rows["  alt: part[:]['index'] (one Arrow batch)"], idx_fast = timed(
                lambda part: np.asarray(part[:][INDEX_KEY], dtype=np.int64), parts)
            t = time.perf_counter()
            all_idx = [np.asarray(partitioner.load_partition(q)[:][INDEX_KEY], dtype=np.int64)
                       for q in range(n)]
            rows["  alt: all partitions' indices once per process (total ms)"] = 1000 * (time.perf_counter() - t)

            def sliced(pid):
                idx = all_idx[pid]
                seed = int(np.random.SeedSequence([cfg.seed, pid]).generate_state(1)[0])
                return train_val_split(ImageArrays(source._train_pixels.x[idx], source._train_pixels.y[idx]),
                                       cfg.validation_fraction, seed)
            rows["  alt: slice precomputed indices + train_val_split"], fast = timed(sliced, pids)
            same = all(np.array_equal(a.train.x, b.train.x) and np.array_equal(a.val.y, b.val.y)
                       for a, b in zip(datas, fast))
            rows["  alt identical to load_client_data"] = float(same)
            # --- client: model
            model = build_model(info, seed=derive_seed(0, 0x1A17))
            record = ArrayRecord(model.state_dict())
            rows["client.build_model (Net.__init__ + probe forward)"], _ = timed(
                lambda _: build_model(info, kind=cfg.model), pids)
            template = build_model(info)
            rows["  alt: copy.deepcopy(template model)"], _ = timed(lambda _: copy.deepcopy(template), pids)
            rows["client.ArrayRecord.to_torch_state_dict"], _ = timed(
                lambda _: record.to_torch_state_dict(), pids)
            rows["client.ArrayRecord(model.state_dict()) (reply)"], _ = timed(
                lambda _: ArrayRecord(model.state_dict()), pids)
            text = cfg.to_json()
            rows["client.RunConfig.from_json (uncached; cached is a dict hit)"], _ = timed(
                lambda _: RunConfig.from_json(text), pids[:20])
            # --- server: central evaluation, once per round
            test = load_test_data(cfg.dataset)
            rows["server.evaluate(model, 10k test images) per round"], _ = timed(
                lambda _: evaluate(model, test), range(3))

        # --- server: aggregate_train of 100 replies, Guarded vs the bare strategy
        info = dataset_info(cfg.dataset)
        model = build_model(info, seed=1)
        arrays = ArrayRecord(model.state_dict())
        node_ids = list(range(1001, 1001 + n))
        sampler = PartitionSampler(cfg.seed, lambda ids: {q: q - 1001 for q in ids})
        inner = strategies.build(cfg, n, total_examples=54 * n)
        guarded = Guarded(inner, sampler=sampler, min_valid_replies=2,
                          example_limits=ExampleLimits(default=10**6))
        grid = type("G", (), {"get_node_ids": lambda self: node_ids})()
        config = ConfigRecord({"run-config": cfg.to_json()})
        t = time.perf_counter()
        messages = list(guarded.configure_train(2, arrays, config, grid))
        rows[f"server.{strategy}.Guarded.configure_train (1st: sampler learns {n} nodes)"] = 1000 * (time.perf_counter() - t)
        t = time.perf_counter()
        messages = list(guarded.configure_train(2, arrays, config, grid))
        rows[f"server.{strategy}.Guarded.configure_train"] = 1000 * (time.perf_counter() - t)
        rng = np.random.default_rng(0)
        replies = []
        spec_keys = list(arrays.keys())
        for m in messages:
            y = {k: (a.numpy() + rng.normal(0, 1e-3, a.shape)).astype(a.dtype) for k, a in arrays.items()}
            rec = ArrayRecord({k: Array(v) for k, v in y.items()})
            if strategy == "scaffold":
                from strategies.scaffold import DC_PREFIX
                for k in spec_keys:
                    rec[DC_PREFIX + k] = Array(np.zeros_like(y[k]))
            reply = Message(RecordDict({"arrays": rec, "metrics": MetricRecord(
                {"num-examples": 54, "train-loss": 1.0, "local-seconds": 0.02})}), reply_to=m)
            replies.append(reply)
        replies = [pickle.loads(pickle.dumps(r)) for r in replies]
        inner_copy = copy.deepcopy(inner)
        t = time.perf_counter()
        guarded.aggregate_train(2, replies)
        rows[f"server.{strategy}.Guarded.aggregate_train (100 replies)"] = 1000 * (time.perf_counter() - t)
        inner_copy.configure_train(2, arrays, ConfigRecord({"run-config": cfg.to_json()}), grid)
        t = time.perf_counter()
        inner_copy.aggregate_train(2, replies)
        rows[f"server.{strategy}.bare aggregate_train (100 replies)"] = 1000 * (time.perf_counter() - t)
        from strategies.validation import split_replies
        t = time.perf_counter()
        split_replies(replies, guarded._expected_spec, "num-examples", lambda m: 10**6)
        rows[f"server.{strategy}.  of which validation.split_replies"] = 1000 * (time.perf_counter() - t)
        t = time.perf_counter()
        copy.deepcopy(guarded.inner.__dict__)
        rows[f"server.{strategy}.  of which deepcopy(inner.__dict__) snapshot"] = 1000 * (time.perf_counter() - t)
        # --- transport: what one train message and its node's Context weigh
        if strategy == "scaffold":
            inner.accepted = {q: 3 for q in node_ids}  # every node accepted once (late in a run)
            msgs = list(guarded.configure_train(3, arrays, config, grid))
            rows[f"transport.scaffold train message pickle KiB ({n} nodes accepted)"] = len(pickle.dumps(msgs[0])) / 1024
            rows["transport.scaffold pickle.dumps+loads of that message"], _ = timed(
                lambda _: pickle.loads(pickle.dumps(msgs[0])), range(20))
            from strategies.scaffold import STATE_CI, STATE_PENDING
            state = RecordDict({STATE_CI: arrays, STATE_PENDING: arrays})
            ctx = Context(run_id=1, node_id=1, node_config={}, state=state, run_config={})
            rows["transport.scaffold node Context pickle KiB (c_i + pending)"] = len(pickle.dumps(ctx)) / 1024
            rows["memory.scaffold per-node state MiB x nodes (simulation process)"] = len(pickle.dumps(ctx)) * n / 2**20
        else:
            rows["transport.fedavg train message pickle KiB"] = len(pickle.dumps(messages[0])) / 1024
    for k, v in rows.items():
        print(f"{v:10.2f}  {k}")
    print(json.dumps({"nodes": n, "k": args.k, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
