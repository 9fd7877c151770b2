"""Simulation on a real two-node Ray cluster (issue 23 item 3): a head and a second raylet
started with `ray start` on this machine, one CPU each; `flwr run` on a SuperLink whose
simulation joins the cluster through RAY_ADDRESS. SCAFFOLD, 4 clients all sampled, 3
rounds: the actors run on both nodes (each train message logs its Ray node), and the
clients' state is intact (their c_i+ are committed from round 2 on, as on one machine).
Every process started here is stopped by process group (never `ray stop`)."""

from __future__ import annotations

import json
import re

import pytest

from deploy.launch import LocalSuperLink
from deploy.ray_cluster import RayCluster

pytestmark = pytest.mark.e2e


def test_a_simulation_runs_on_both_nodes_of_a_ray_cluster_with_scaffolds_state(tmp_path):
    cluster = RayCluster(nodes=2, cpus_per_node=1, env={"FL_APP_LOG_PLACEMENT": "1"}).start()
    link = None
    try:
        nodes = {n["id"] for n in cluster.alive_nodes()}
        assert len(nodes) == 2
        link = LocalSuperLink(tmp_path, extra_env={"RAY_ADDRESS": cluster.address,
                                                   "RAY_DEDUP_LOGS": "0"}).start()
        proc = link.run({"strategy": "scaffold", "num-server-rounds": 3, "fraction-train": 1.0,
                         "fraction-evaluate": 0.0, "partitioner": "dirichlet", "alpha": 1.0,
                         "run-name": "ray-cluster", "results-dir": str(tmp_path / "results")},
                        num_supernodes=4, num_cpus=1, timeout=900)
        output = proc.stdout + proc.stderr
        path = tmp_path / "results" / "ray-cluster" / "summary.json"
        assert path.exists(), output[-3000:]
        summary = json.loads(path.read_text())
        placements = re.findall(r"placement: ray-node=([0-9a-f]+) partition=(\d) round=(\d)", output)
        trained = {(int(p), int(r)): node for node, p, r in placements}  # (log lines repeat)
        assert sorted(trained) == [(p, r) for p in range(4) for r in (1, 2, 3)], output[-3000:]
        assert set(trained.values()) == nodes  # both nodes trained
        assert len(set(placements)) == 12  # and each message ran on one node only
        assert summary["status"] == "completed"
        # the share of replies whose client committed its c_i+ (every client, every round
        # after its first): the accepted map and the client state met on either node
        assert [r["scaffold_committed"] for r in summary["history"][2:]] == [1.0, 1.0]
        assert summary["final_test_accuracy"] > 0.5
    finally:
        if link is not None:
            link.stop()
        cluster.stop()
    assert all(p.poll() is not None for p in cluster.processes)
