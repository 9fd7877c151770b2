"""ServerApp checks that run before any training."""

from __future__ import annotations

import time

import pytest

from fl_app import server_app


class InMemoryGrid:  # the simulation engine's grid, as server_app.is_simulation sees it
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


class GrpcGrid(InMemoryGrid):  # a deployment's grid: nodes may still connect
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
