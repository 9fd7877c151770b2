"""Flower's deployment runtime: a SuperLink and two SuperNodes as separate processes.

Each SuperNode holds one partition through its node config; every message starts a
fresh ClientApp process, as on real devices. Slow (~1.5 min): each ClientApp process
imports PyTorch.
"""

from __future__ import annotations

import json

import pytest

from experiments.launch import LocalSuperLink

pytestmark = pytest.mark.e2e


def deploy(tmp_path, num_nodes: int, run_name: str, **overrides) -> dict:
    """Start a SuperLink and ``num_nodes`` SuperNodes, run the app, stop every process
    (checked), and return the run's summary."""
    link = LocalSuperLink(tmp_path, simulation=False).start()
    try:
        for pid in range(num_nodes):
            link.add_supernode(pid, num_nodes)
        proc = link.run({"num-server-rounds": 2, "run-name": run_name,
                         "results-dir": str(tmp_path / "results"), **overrides}, timeout=900)
        path = tmp_path / "results" / run_name / "summary.json"
        assert path.exists(), proc.stdout[-3000:] + proc.stderr[-2000:]
        summary = json.loads(path.read_text())
    finally:
        processes = [link.process, *link.supernodes]
        link.stop()
    assert all(p.poll() is not None for p in processes)
    return summary


def test_superlink_and_two_supernodes_train_and_record(tmp_path):
    summary = deploy(tmp_path, 2, "deployed")
    assert summary["complete"] and summary["num_nodes"] == 2 and summary["num_partitions"] == 2
    assert summary["history"][-1]["replies_valid"] == 2
    assert summary["final_test_accuracy"] > 0.5  # chance is 0.1


def test_secure_aggregation_runs_on_the_deployment_runtime(tmp_path):
    """SecAgg+ with the same code path as in simulation: 3 SuperNodes (3 shares, threshold
    2), each protocol stage a fresh ClientApp process whose protocol state lives in the
    SuperNode's Context.state."""
    summary = deploy(tmp_path, 3, "deployed-secagg", **{
        "secagg": True, "secagg-num-shares": 3, "secagg-reconstruction-threshold": 2})
    assert summary["status"] == "completed", summary.get("error")
    rounds = summary["history"][1:]
    assert all(r["secagg_survivors"] == 3 and r["round_aggregated"] == 1 for r in rounds)
    assert summary["final_test_accuracy"] > 0.5  # chance is 0.1
