"""End to end: 2 sign-flip attackers out of 10 simulated clients (a real `flwr run`):
FedAvg is wrecked, Krum keeps learning and never selects an attacker."""

from __future__ import annotations

import json

import pytest

from deploy.launch import LocalSuperLink

pytestmark = pytest.mark.e2e

BASE = {"dataset": "digits", "num-server-rounds": 6, "partitioner": "iid", "local-epochs": 3,
        "attack": "sign-flip", "num-attackers": 2, "attack-scale": 10.0, "min-train-nodes": 7}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("robust")
    sweep = workdir / "sweep.json"
    sweep.write_text(json.dumps([
        {"run-name": "fedavg", **BASE},
        {"run-name": "krum", **BASE, "strategy": "krum", "num-malicious": 2},
    ]))
    with LocalSuperLink(workdir) as link:
        proc = link.run({"sweep-file": str(sweep), "results-dir": str(workdir / "results")},
                        num_supernodes=10, timeout=900)
    out = workdir / "results"
    assert (out / "krum" / "summary.json").exists(), proc.stdout[-3000:] + proc.stderr[-2000:]
    return {name: json.loads((out / name / "summary.json").read_text()) for name in ("fedavg", "krum")}


def test_krum_keeps_learning_where_fedavg_does_not(results):
    fedavg, krum = results["fedavg"], results["krum"]
    assert fedavg["complete"] and krum["complete"]
    assert krum["final_test_accuracy"] > 0.6, [r["test_accuracy"] for r in krum["history"]]
    assert fedavg["final_test_accuracy"] < 0.3, [r["test_accuracy"] for r in fedavg["history"]]
    for record in krum["history"][1:]:
        assert record["attackers_sampled"] == 2 and record["attackers_selected"] == 0
        assert record["krum_skipped"] == 0 and record["replies_valid"] == 10
