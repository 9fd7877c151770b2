"""Simulation's start-up without queries: the server assigns the partitions (node ids
sorted, partition = rank), every message carries the assignment, and only a simulated
ClientApp takes it (fl_app/nodes.py, fl_app/assignment.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

import strategies
from fl_app import client_app
from fl_app.assignment import STATE_KEY, node_partition, partition_id
from fl_app.model import build_model
from fl_app.nodes import AssigningGrid, NodeDirectory
from fl_common import wire
from partitions import dataset_info
from strategies.sampling import PartitionSampler
from strategies.scaffold import scaffold_file
from tests.helpers import ClientAppGrid, wire_roundtrip


class CountingGrid:
    """Node ids only; counts (and answers, by creation index) every query it is sent."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)
        self.sent = 0

    def get_node_ids(self):
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent += len(messages)
        index = {n: i for i, n in enumerate(self.node_ids)}  # the engine's partition-id
        return [Message(RecordDict({wire.METRICS: MetricRecord({
            wire.PARTITION_ID: index[m.metadata.dst_node_id],
            wire.NUM_PARTITIONS: len(self.node_ids)})}), reply_to=m) for m in messages]


def random_node_ids(n: int, seed: int) -> list[int]:
    return random.Random(seed).sample(range(1, 2**63), n)  # as Flower draws them: random


def test_in_simulation_one_node_is_asked_and_partitions_follow_the_sorted_node_ids():
    ids = random_node_ids(50, 1)
    grid = CountingGrid(ids)
    nodes = NodeDirectory(grid, assign=True)
    assert nodes.num_partitions(ids) == 50
    assert nodes.discover(ids) == {n: rank for rank, n in enumerate(sorted(ids))}
    assert nodes.without_state(ids) == [] and nodes.own_data(ids, 50, 10) == {}
    assert grid.sent == 1 and nodes.queries_sent == 1  # one node, for the federation's size
    asked = NodeDirectory(grid)  # deployment: one query per node, as before
    assert asked.num_partitions(ids) == 50 and grid.sent == 1 + 50


def sampled_partitions(nodes: NodeDirectory, ids: list[int], seed: int, rounds=5, k=7):
    sampler = PartitionSampler(seed, nodes.discover)
    return [[sampler.partition_of[n] for n in sampler.choose(ids, k, r, stage)]
            for r in range(1, rounds + 1) for stage in ("train", "evaluate")]


def test_the_same_seed_samples_the_same_partitions_for_any_node_ids():
    """Two runs' random node-id sets, assigned: the same partitions every round, and the
    ones the query path sampled (partitions ordered by id either way)."""
    a, b = random_node_ids(40, 2), random_node_ids(40, 3)
    assert set(a) != set(b)
    first = sampled_partitions(NodeDirectory(CountingGrid(a), assign=True), a, seed=11)
    second = sampled_partitions(NodeDirectory(CountingGrid(b), assign=True), b, seed=11)
    queried = sampled_partitions(NodeDirectory(CountingGrid(a)), a, seed=11)
    assert first == second == queried
    assert sampled_partitions(NodeDirectory(CountingGrid(b), assign=True), b, seed=12) != first


def test_every_message_carries_its_own_nodes_assignment_and_the_shared_content_is_untouched():
    ids = random_node_ids(3, 4)

    class Recording(CountingGrid):
        def push_messages(self, messages):
            self.pushed = list(messages)
            return ["m"] * len(self.pushed)

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if all(m.metadata.message_type == "query" for m in messages):
                return super().send_and_receive(messages)  # the one size query
            self.received = messages
            return []

    inner = Recording(ids)
    nodes = NodeDirectory(inner, assign=True)
    nodes.discover(ids)
    grid = AssigningGrid(inner, nodes)
    shared = RecordDict({wire.CONFIG: ConfigRecord({"x": 1})})  # as Flower's strategies share one
    grid.send_and_receive([Message(shared, dst_node_id=n, message_type="train") for n in ids])
    grid.push_messages([Message(shared, dst_node_id=n, message_type="evaluate") for n in ids])
    for sent in (inner.received, inner.pushed):
        got = {m.metadata.dst_node_id: (m.content[wire.ASSIGNED][wire.PARTITION_ID],
                                        m.content[wire.ASSIGNED][wire.NUM_PARTITIONS])
               for m in sent}
        assert got == {n: (rank, 3) for rank, n in enumerate(sorted(ids))}
        assert all(m.content[wire.CONFIG] is shared[wire.CONFIG] for m in sent)
    assert wire.ASSIGNED not in shared
    with pytest.raises(ValueError, match="assigns partitions"):
        AssigningGrid(inner, NodeDirectory(inner))


def _assigned(pid: int, num: int, content: RecordDict | None = None) -> Message:
    content = content if content is not None else RecordDict()
    content[wire.ASSIGNED] = ConfigRecord({wire.PARTITION_ID: pid, wire.NUM_PARTITIONS: num})
    return wire_roundtrip(Message(content, dst_node_id=7, message_type="train"))


def _context(pid=0, num=4) -> Context:
    return Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                   node_config={wire.PARTITION_ID: pid, wire.NUM_PARTITIONS: num})


def test_a_simulated_client_takes_the_assignment_and_keeps_it_for_messages_without_one():
    context = _context(pid=0)
    assert node_partition(context, _assigned(3, 4)) == (3, 4)
    assert STATE_KEY in context.state.config_records
    bare = wire_roundtrip(Message(RecordDict(), dst_node_id=7, message_type="train"))
    assert node_partition(context, bare) == (3, 4) and partition_id(context, bare) == 3
    assert node_partition(_context(pid=1), bare) == (1, 4)  # never assigned: its node config
    with pytest.raises(ValueError, match=r"partition-id=4 is not in \[0, num-partitions=4\)"):
        node_partition(_context(), _assigned(4, 4))


@pytest.mark.deployed_node
def test_a_deployed_client_refuses_a_server_assigned_partition(make_config):
    """A deployed SuperNode's partition is its own node config: a train or evaluate
    message that names one is refused with an error reply naming why, before any data
    is touched; and nothing remembered could make it take one later."""
    cfg = make_config()
    info = dataset_info(cfg.dataset)
    arrays = ArrayRecord(build_model(info, seed=0).state_dict())
    context = _context(pid=0)
    for kind in ("train", "evaluate"):
        content = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord({
            wire.RUN_CONFIG: cfg.to_json(), wire.RUN_TAG: "t", wire.SERVER_ROUND: 1})})
        msg = _assigned(2, 4, content)
        msg.metadata.__dict__["_message_type"] = kind
        reply = client_app.app(msg, context)
        assert reply.has_error() and reply.error.code == wire.ASSIGNMENT_ERROR_CODE
        assert "only simulated nodes take one from the server" in reply.error.reason
    assert STATE_KEY not in context.state.config_records
    context.state.config_records[STATE_KEY] = ConfigRecord({wire.PARTITION_ID: 2,
                                                            wire.NUM_PARTITIONS: 4})
    assert node_partition(context) == (0, 4)  # a planted state entry is not read either


# ------------------------------------------------ SCAFFOLD through the assigning grid
N = 4


def in_process_grid(node_ids) -> ClientAppGrid:
    """The ClientApp in this process; the nodes' node-config partition-ids are the
    engine's creation indices, which the assignment does not use."""
    return ClientAppGrid({n: _context(pid=i, num=N) for i, n in enumerate(node_ids)})


def test_scaffold_state_is_keyed_by_the_assigned_partition(make_config, tmp_path):
    """Creation order != id order: each sampled client trains, and keeps its c_i on disk,
    under the partition the server assigned (the one the server's accepted map names),
    not the engine's creation index, so a resume with other node ids finds it."""
    ids = [40, 10, 30, 20]  # creation index 0..3; sorted rank: 10->0, 20->1, 30->2, 40->3
    cfg = make_config(strategy="scaffold", **{"min-train-nodes": 2, "fraction-train": 0.5,
                                              "fraction-evaluate": 0.0,
                                              "scaffold-weighting": "uniform"})
    inner = in_process_grid(ids)
    nodes = NodeDirectory(inner, assign=True)
    sampler = PartitionSampler(cfg.seed, nodes.discover)
    strategy = strategies.guarded(cfg.strategy, strategies.build(cfg, N, total_examples=1000),
                                  sampler=sampler, min_valid_replies=2)
    info = dataset_info(cfg.dataset)
    config = ConfigRecord({wire.RUN_CONFIG: cfg.to_json(), wire.RUN_TAG: "assigned",
                           wire.CLIENT_STATE_DIR: str(tmp_path)})
    strategy.start(AssigningGrid(inner, nodes), ArrayRecord(build_model(info, seed=0).state_dict()),
                   num_rounds=1, timeout=600.0, train_config=config,
                   evaluate_config=ConfigRecord(config), evaluate_fn=lambda r, a: None)
    assert sampler.partition_of == {10: 0, 20: 1, 30: 2, 40: 3}
    queries = [m for m in inner.seen if m.metadata.message_type == "query"]
    seen = [m for m in inner.seen if m.metadata.message_type != "query"]
    assert len(queries) == 1  # one node, for the federation's size
    trained = [m.metadata.dst_node_id for m in seen]
    assert len(trained) == 2 and all(m.content[wire.ASSIGNED][wire.PARTITION_ID] == sampler.partition_of[
        m.metadata.dst_node_id] for m in seen)
    assigned = {sampler.partition_of[n] for n in trained}
    engine = {ids.index(n) for n in trained}
    assert assigned != engine  # the test tells the two apart
    assert {p.name for p in tmp_path.iterdir()} == {
        scaffold_file(tmp_path, "assigned", p).name for p in assigned}
    assert strategy.last_train_metrics[wire.REPLIES_VALID] == 2


def test_the_secagg_quantization_seed_uses_the_assigned_partition(make_config, monkeypatch):
    """SecAgg+'s stage message carries the assignment (it goes through the same grid);
    the stochastic-rounding seed is the assigned partition's, not the engine's index."""
    from fl_app import secagg_client
    from fl_common.randomness import derive_seed

    cfg = make_config()
    content = RecordDict({wire.CONFIG: ConfigRecord({wire.RUN_CONFIG: cfg.to_json(),
                                                     wire.SERVER_ROUND: 2})})
    seeds = []
    monkeypatch.setattr(np.random, "seed", seeds.append)
    secagg_client._seed_quantization(_assigned(3, 4, content), _context(pid=0))
    assert seeds == [derive_seed(cfg.seed, 2, 3, secagg_client.QUANTIZATION_TAG)]


def test_the_fault_draw_uses_the_assigned_partition(make_config):
    from fl_app import faults

    cfg = make_config(**{"fault-kind": "nan", "fault-rate": 0.5})
    content = RecordDict({wire.CONFIG: ConfigRecord({wire.RUN_CONFIG: cfg.to_json(),
                                                     wire.SERVER_ROUND: 1})})
    for pid in range(4):
        kind, _ = faults._fault_of(_assigned(pid, 4, RecordDict(dict(content))), _context(pid=0))
        assert (kind is not None) == faults.is_faulty(cfg.seed, 1, pid, 0.5)


def test_the_partitions_are_assigned_over_the_whole_federation_while_it_registers():
    """Flower registers the simulated nodes in a thread started with the ServerApp's: the
    server learns the federation's size from one node (its node config's num-partitions)
    and assigns over all of its nodes, not over the first few it saw, however slowly
    they appear."""
    ids = random_node_ids(10, 4)

    class Growing(CountingGrid):
        def __init__(self):
            super().__init__(ids)
            self.calls = 0

        def get_node_ids(self):
            self.calls += 1
            return list(self.node_ids[:min(self.calls, 10)])  # one more each look

    grid = Growing()
    nodes = NodeDirectory(grid, assign=True)
    seen = grid.get_node_ids()
    assert len(seen) == 1
    assert nodes.num_partitions(seen) == 10
    assert nodes.discover(ids) == {n: rank for rank, n in enumerate(sorted(ids))}
    assert grid.sent == 1
