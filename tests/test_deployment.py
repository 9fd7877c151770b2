"""Flower's deployment runtime: a SuperLink and two SuperNodes as separate processes.

Each SuperNode holds one partition through its node config; every message starts a
fresh ClientApp process, as on real devices. One deployment is insecure and its nodes
read their own data; one holds benchmark partitions over TLS, with SuperNode
authentication and SecAgg+; in one, FedPer and FedLoRA keep their personal layers and
their base on the nodes; in one, the ServerApp fails and the launcher says so. Slow
(minutes): each ClientApp process imports PyTorch. A SuperLink restart, a SuperNode
stopped and restarted, and one killed mid-protocol are in tests/test_deployment_faults.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deploy.credentials import make_all
from deploy.launch import LocalSuperLink

pytestmark = pytest.mark.e2e


def deploy(tmp_path, num_nodes: int, run_name: str, secure: bool = False,
           node_configs: list[str] | None = None, warm: bool = False, prompt: bool = False,
           **overrides) -> tuple[dict, dict]:
    """Start a SuperLink and ``num_nodes`` SuperNodes, run the app, stop every process
    (checked), and return the run's summary.

    ``secure``: TLS with development credentials (deploy/credentials.py) and SuperNode
    authentication; the nodes' keys are registered, and one more SuperNode with a key
    nobody registered tries to join. ``warm``: the ClientApps are forked by the warm
    server (deploy/warm_clientapp.py); every message must have gone through it.
    ``prompt``: the SuperNodes pull every 0.2 s (deploy/prompt_supernode.py). Returns ``(summary, what happened to that node)``.
    """
    files = make_all(tmp_path / "credentials", nodes=num_nodes + 1) if secure else None
    link = LocalSuperLink(tmp_path, simulation=False, tls=files.root if secure else None,
                          node_auth=secure, warm_clientapp=warm,
                          supernode_pull_seconds=0.2 if prompt else None).start()
    intruder = None
    try:
        for pid in range(num_nodes):
            if secure:
                link.register_node(files.node_public_key(pid))
            link.add_supernode(pid, num_nodes, private_key=files.node_key(pid) if secure else None,
                               node_config=node_configs[pid] if node_configs else "")
        if secure:  # holds a valid partition, but its key was never registered
            intruder = link.add_supernode(0, num_nodes, private_key=files.node_key(num_nodes))
        proc = link.run({"num-server-rounds": 1, "run-name": run_name,
                         "results-dir": str(tmp_path / "results"), **overrides}, timeout=900)
        path = tmp_path / "results" / run_name / "summary.json"
        assert path.exists(), proc.stdout[-3000:] + proc.stderr[-2000:]
        summary = json.loads(path.read_text())
        refused = {"warm_requests": link.warm_requests()}
        if intruder is not None:
            intruder.wait(timeout=120)
            refused.update({"returncode": intruder.returncode,
                            "log": link.supernode_log(num_nodes).read_text()})
    finally:
        processes = [link.process, link.warm_process, *link.supernodes]
        link.stop()
    assert all(p is None or p.poll() is not None for p in processes)
    return summary, refused


def test_supernodes_train_on_their_own_data(tmp_path):
    """3 SuperNodes: two read their own IDX folders (node config data-path), one holds
    benchmark partition 2 of 3. The server takes the sizes and label counts the first two
    report, the clients need no dataset copy for their own data, and all three train."""
    import numpy as np

    from partitions import DataConfig, check_partitions
    from partitions.sources import load_digits_split
    from tests.test_device_data import write_idx

    train, _ = load_digits_split(0)  # the benchmark's train split: the test split stays out
    pixels = np.rint((train.x[:, 0].astype(np.float64) * 0.5 + 0.5) * 255).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(train.y))
    halves = [order[: len(order) // 2], order[len(order) // 2:]]
    configs = []
    for pid, rows in enumerate(halves):
        write_idx(tmp_path / f"device-{pid}", pixels[rows], train.y[rows])
        configs.append(f'partition-id={pid} num-partitions=3 '
                       f'data-path="{tmp_path / f"device-{pid}"}"')
    configs.append("partition-id=2 num-partitions=3")
    summary, _ = deploy(tmp_path, 3, "own-data", node_configs=configs, warm=True, prompt=True,  # evaluation proves
                        **{"fraction-evaluate": 0.0})  # nothing more here: it costs a process
    assert summary["status"] == "completed", summary.get("error")
    assert summary["data_source"] == {"0": "node data-path", "1": "node data-path",
                                      "2": "benchmark partition"}
    benchmark = check_partitions(DataConfig("digits", "iid", 0.5, 2, 2, 0.1, 0), 3)
    assert summary["partition_sizes"] == [len(halves[0]), len(halves[1]), benchmark[2]]
    for pid, rows in enumerate(halves):
        assert summary["label_counts"][str(pid)] == np.bincount(train.y[rows], minlength=10).tolist()
    assert summary["num_nodes"] == 3
    assert all(r["replies_valid"] == 3 for r in summary["history"][1:])
    assert summary["final_test_accuracy"] > 0.5  # chance is 0.1


def test_tls_node_auth_and_secure_aggregation_on_the_deployment_runtime(tmp_path):
    """TLS (a development CA), SuperNode authentication (3 registered keys; a 4th node with
    an unregistered key is refused and exits), and SecAgg+ with the same code path as in
    simulation: every protocol stage a ClientApp process of its own, forked by the warm
    server, by SuperNodes that pull every 0.2 s (`deploy.local`'s defaults), whose protocol state lives in the
    SuperNode's Context.state. The run config is docs/deployment.md's step 6
    (`min-train-nodes=3 secagg=true`, nothing else of SecAgg+): its "auto" shares and
    threshold are 3 and 2 with 3 nodes."""
    summary, refused = deploy(tmp_path, 3, "deployed-secure", secure=True, warm=True,
                              prompt=True, **{
        "min-train-nodes": 3, "secagg": True,
        "fraction-evaluate": 0.0})  # federated evaluation is not what this test is about
    assert summary["status"] == "completed", summary.get("error")
    assert summary["num_nodes"] == 3  # the intruder never joined
    assert refused["returncode"] != 0 and "Failed to activate SuperNode" in refused["log"]
    rounds = summary["history"][1:]
    assert all(r["secagg_survivors"] == 3 and r["round_aggregated"] == 1 for r in rounds)
    assert summary["final_test_accuracy"] > 0.5  # chance is 0.1
    # 3 nodes x (size query + SecAgg+'s 4 stages), none of them started cold
    assert refused["warm_requests"] == 15



def test_a_serverapp_failure_is_in_the_summary_and_the_launcher_exits_non_zero(tmp_path, capsys):
    """``flwr run`` exits 0 when the ServerApp raises; the launcher (deploy.local) must
    not: the run fails after round 1 (fail-after-round, a test facility), summary.json
    says failed with the error, and the launcher returns 1 after stopping every process."""
    from deploy import local

    code = local.main(["--nodes", "2", "--workdir", str(tmp_path), "-c",
                       'num-server-rounds=2 fail-after-round=1 fraction-evaluate=0.0 '
                       'run-name="fails"'])
    assert code == 1
    summary = json.loads((tmp_path / "results" / "fails" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_completed"] == 1
    assert summary["error"] == ("SimulatedFailure: fail-after-round = 1: a simulated ServerApp "
                                "failure (test facility)")
    assert "The run did not complete" in capsys.readouterr().err


def test_fedper_and_fedlora_keep_their_state_and_their_base_on_the_nodes(tmp_path):
    """Two SuperNodes, each with a state folder and its own copy of the base. FedPer, 2
    rounds: each node's personal layer (the head) is on its own disk, committed, trained and
    unlike the other node's; the server's saved model holds the base layers only, and the
    upload is their bytes alone. FedLoRA, 1 round on the same nodes: each node loads the base
    from its own node config, only the adapters and the head travel (3,310 values), and the
    server's merged model scores the run's final accuracy. The ClientApps are forked by
    the warm server and the SuperNodes pull every 0.2 s (deploy.local's defaults). (FedLoRA refusing a node with another base,
    deployed: experiments/fedlora_deployed.py.)"""
    import shutil

    import torch

    from fl_app.model import build_model
    from fl_app.results import load_model
    from fl_app.training import evaluate
    from partitions import dataset_info, load_test_data
    from strategies.fedlora import sha256_file
    from strategies.fedper import _read_disk, split_keys

    base_file = Path(__file__).resolve().parent.parent / "bases" / "cnn-digits-mnist.npz"
    link = LocalSuperLink(tmp_path, simulation=False, warm_clientapp=True,
                          supernode_pull_seconds=0.2).start()
    try:
        for pid in range(2):
            node = tmp_path / f"node-{pid}"
            node.mkdir()
            shutil.copyfile(base_file, node / "base.npz")
            link.add_supernode(pid, 2, node_config=(
                f'partition-id={pid} num-partitions=2 state-dir="{node / "state"}" '
                f'lora-base="{node / "base.npz"}"'))
        results = tmp_path / "results"
        common = {"results-dir": str(results), "min-train-nodes": 2}
        ran = {name: link.run({**common, **overrides, "run-name": name}, timeout=900)
               for name, overrides in [  # FedPer commits a round's layers in the next round
                   ("fedper", {"strategy": "fedper", "personal-layers": 1, "num-server-rounds": 2}),
                   ("fedlora", {"strategy": "fedlora", "lora-base": str(base_file),
                                "num-server-rounds": 1, "fraction-evaluate": 0.0})]}
        processes = [link.process, *link.supernodes]
    finally:
        link.stop()
    assert all(p.poll() is not None for p in processes)
    # the SuperNodes ran with their waits capped (deploy/prompt_supernode.py)
    assert all(Path(p.args[1]).parts[-2:] == ("supernode-bin", "flower-supernode")
               for p in link.supernodes)
    summaries = {}
    for name, proc in ran.items():
        path = results / name / "summary.json"
        assert path.exists(), proc.stdout[-3000:] + proc.stderr[-2000:]
        summaries[name] = json.loads(path.read_text())
        assert summaries[name]["status"] == "completed", summaries[name].get("error")

    fedper = summaries["fedper"]
    model = build_model(dataset_info("digits"), seed=0)
    base_keys, personal_keys = split_keys(model, 1)
    state = model.state_dict()
    base_values = sum(state[k].numel() for k in base_keys)
    personal_values = sum(state[k].numel() for k in personal_keys)
    upload = fedper["history"][-1]["upload_bytes_per_client"]
    assert 4 * base_values <= upload < 4 * (base_values + personal_values)  # the head stays
    server_model = load_model(results / "fedper" / "final_model.npz")
    assert sorted(server_model) == sorted(base_keys)  # the server never held a head
    initial_head = {k: state[k].numpy() for k in personal_keys}
    heads = []
    for pid in range(2):
        files = list((tmp_path / f"node-{pid}" / "state").glob("fedper-*.npz"))
        assert len(files) == 1, files
        meta, slots = _read_disk(files[0])
        assert meta["committed"] >= 1 and sorted(slots["committed"]) == sorted(personal_keys)
        heads.append(slots["committed"])
    for key in personal_keys:
        assert not np.allclose(heads[0][key], heads[1][key])  # personal, not averaged
        assert all(not np.allclose(h[key], initial_head[key]) for h in heads)  # trained
    assert fedper["history"][-1]["val_accuracy"] > 0.5  # each node's own layers on its data

    fedlora = summaries["fedlora"]
    assert fedlora["config"]["lora-base-sha256"] == sha256_file(base_file)
    upload = fedlora["history"][-1]["upload_bytes_per_client"]
    assert 3310 * 4 <= upload < 3310 * 4 * 1.1
    merged = build_model(dataset_info("digits"), seed=0)
    merged.load_state_dict({k: torch.from_numpy(v) for k, v in
                            load_model(results / "fedlora" / "final_model.npz").items()})
    _, accuracy = evaluate(merged, load_test_data("digits"))
    assert accuracy == pytest.approx(fedlora["final_test_accuracy"], abs=1e-9)
