"""ServerApp checks that run before any training."""

from __future__ import annotations

import time

import pytest
from flwr.superlink.grid import inmemory_grid as flwr_inmemory

from fl_app import server_app


class _Nodes:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


class InMemoryGrid(_Nodes, flwr_inmemory.InMemoryGrid):  # Flower's simulation grid, stateless
    pass


class GrpcGrid(_Nodes):  # a deployment's grid: nodes may still connect
    pass


def test_too_few_simulated_nodes_fail_at_once_naming_both_settings(monkeypatch):
    monkeypatch.setattr(server_app, "SIMULATION_NODE_GRACE", 0.2)
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"1 node\(s\) \('num-supernodes'.*'min-train-nodes' = 2"):
        server_app.wait_for_nodes(InMemoryGrid([7]), 2, timeout=600)
    assert time.monotonic() - started < 5


def test_enough_nodes_return_at_once_and_deployment_waits_its_timeout():
    assert server_app.wait_for_nodes(InMemoryGrid([1, 2, 3]), 2) == [1, 2, 3]
    with pytest.raises(RuntimeError, match="Only 1 node"):
        server_app.wait_for_nodes(GrpcGrid([7]), 2, timeout=0.5)


@pytest.mark.parametrize("overrides, fragment", [
    ({"partitioner": "shard", "shards-per-partition": 1000},
     "'shards-per-partition' = 1000 x 10 partitions = 10000 shards, more than the 1437"),
    ({"partitioner": "pathological", "classes-per-partition": 11},
     "'classes-per-partition' = 11 exceeds the 10 classes"),
])
def test_impossible_splits_are_refused_before_splitting(make_config, overrides, fragment):
    from partitions import preflight

    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        preflight(make_config(**overrides).data, 10)


def test_a_dirichlet_split_too_fine_for_its_minimum_is_refused(make_config):
    from partitions import preflight

    with pytest.raises(ValueError, match="needs at least 10 samples per partition: 200"):
        preflight(make_config(partitioner="dirichlet").data, 200)


def test_unwritable_results_dir_and_corrupt_dataset_are_named(tmp_path, make_config):
    from partitions import preflight

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="'results-dir' .* is not a writable directory"):
        server_app.check_results_dir(str(blocker / "results"))
    corrupt = tmp_path / "broken.parquet"
    corrupt.write_bytes(b"not a parquet file" * 10)
    with pytest.raises(ValueError, match=r"'dataset' = .*broken.parquet' could not be read"):
        preflight(make_config(dataset=str(corrupt)).data)


def test_a_sweep_entry_whose_dirichlet_split_cannot_be_drawn_fails_before_the_first_run(
        tmp_path, defaults, monkeypatch, recwarn):
    """flwr-datasets' Dirichlet partitioner gives up after 10 draws: that is found for
    every sweep entry before the first run starts, in one message naming 'alpha', and
    without the partitioner's ten warnings."""
    import json

    from flwr.app import Context, RecordDict

    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps([{"run-name": "fine"},
                                 {"run-name": "too-fine", "partitioner": "dirichlet", "alpha": 0.001}]))
    monkeypatch.setattr(server_app.NodeDirectory, "num_partitions", lambda self, ids: 50)
    ran = []
    monkeypatch.setattr(server_app, "run_one", lambda *args: ran.append(args))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={
        **defaults, "sweep-file": str(sweep), "results-dir": str(tmp_path / "results")})
    with pytest.raises(ValueError, match=r"'alpha' = 0.001: flwr-datasets' DirichletPartitioner "
                                         r"could not give each of the 50 partitions"):
        server_app.main(InMemoryGrid(range(50)), context)
    assert ran == []
    assert not [w for w in recwarn if "attempts" in str(w.message) or "alpha" in str(w.message)]


def test_nodes_are_asked_for_their_partition_in_bounded_batches():
    """At 10,000 simulated nodes, one batch of 10,000 queries outlasts its timeout in
    Flower's in-memory delivery loop; the directory asks QUERY_BATCH nodes at a time."""
    from flwr.app import Message, MetricRecord, RecordDict

    from fl_common import wire

    class AnsweringGrid(InMemoryGrid):
        batches: list[int] = []

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            self.batches.append(len(messages))
            replies = []
            for msg in messages:
                reply = Message(RecordDict({wire.METRICS: MetricRecord({
                    wire.PARTITION_ID: msg.metadata.dst_node_id - 1,
                    wire.NUM_PARTITIONS: 2500})}), reply_to=msg)
                replies.append(reply)
            return replies

    grid = AnsweringGrid(range(1, 2501))
    from fl_app.nodes import NodeDirectory

    nodes = NodeDirectory(grid)
    mapping = nodes.discover(list(range(1, 2501)))
    assert grid.batches == [1000, 1000, 500]
    assert mapping == {n: n - 1 for n in range(1, 2501)}
    assert nodes.num_partitions(list(range(1, 2501))) == 2500 and grid.batches == [1000, 1000, 500]


def test_seeded_dp_randomness_is_refused_outside_simulation(make_config, caplog):
    seeded = make_config(dp=True, **{"dp-randomness": "seeded"})
    with pytest.raises(ValueError, match="'dp-randomness' = \"seeded\" is accepted only in simulation"):
        server_app.check_dp_randomness(seeded, GrpcGrid([1]))
    server_app.check_dp_randomness(make_config(dp=True), GrpcGrid([1]))  # secure: fine
    with caplog.at_level("WARNING"):
        server_app.check_dp_randomness(seeded, InMemoryGrid([1]))
    assert "NO guarantee against anyone who knows it" in caplog.text


class _ScriptedGrid(_Nodes):
    """A deployment's grid answering each query with what a node's script gives (a
    malicious node's)."""

    def __init__(self, scripts):
        super().__init__(list(scripts))
        self.scripts = scripts

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Message

        return [Message(self.scripts[m.metadata.dst_node_id](), reply_to=m) for m in messages]


def _metrics(**entries):
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    def content():
        record = RecordDict({"metrics": MetricRecord(entries)}) if entries else RecordDict(
            {"config": ConfigRecord({"x": 1})})
        return record
    return content


def test_a_malformed_query_reply_leaves_that_node_out_instead_of_crashing_the_run():
    """The review's tampered query replies (issue 20): no metrics record, a list-valued
    partition-id, partition 99 of 3, a float partition id, a size that disagrees with its
    label counts. Each such node is left out with its reason; the honest ones stay."""
    from fl_app.nodes import NodeDirectory

    grid = _ScriptedGrid({
        1: _metrics(**{"partition-id": 0, "num-partitions": 3}),
        2: _metrics(),  # no metrics record
        3: _metrics(**{"partition-id": [1, 2], "num-partitions": 3}),
        4: _metrics(**{"partition-id": 99, "num-partitions": 3}),
        5: _metrics(**{"partition-id": 1.5, "num-partitions": 3}),
        6: _metrics(**{"partition-id": 2, "num-partitions": 3, "own-data": 1, "data-size": 10,
                       "label-counts": [1, 2]}),
        7: _metrics(**{"partition-id": 1, "num-partitions": 3, "keeps-state": 1}),
    })
    nodes = NodeDirectory(grid)
    assert nodes.discover(list(range(1, 8))) == {1: 0, 7: 1}
    assert nodes.num_partitions(list(range(1, 8))) == 3
    assert sorted(nodes.malformed) == [2, 3, 4, 5, 6]
    assert "no 'metrics' record" in nodes.malformed[2] and "[0, num-partitions = 3)" in nodes.malformed[4]
    assert "disagrees with its label counts" in nodes.malformed[6]
    assert nodes.without_state(list(range(1, 8))) == [0]


def test_dp_in_deployment_needs_every_node_to_keep_state(make_config):
    from fl_app.nodes import NodeDirectory

    grid = _ScriptedGrid({
        1: _metrics(**{"partition-id": 0, "num-partitions": 2, "keeps-state": 1}),
        2: _metrics(**{"partition-id": 1, "num-partitions": 2, "keeps-state": 0}),
    })
    nodes = NodeDirectory(grid)
    with pytest.raises(ValueError, match=r"partition\(s\) \[1\] have no node config 'state-dir'"):
        server_app.check_dp_deployment(make_config(dp=True), grid, nodes, [1, 2])
    server_app.check_dp_deployment(make_config(), grid, nodes, [1, 2])  # no DP: fine
    server_app.check_dp_deployment(make_config(dp=True, **{"dp-mode": "user"}), grid, nodes, [1, 2])
