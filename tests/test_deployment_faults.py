"""Flower's deployment runtime when something goes wrong: a SuperLink restarted on its
database under TLS and SuperNode authentication, a SuperNode stopped mid-run and
restarted under DP-SGD, and a SuperNode killed in the middle of the SecAgg+ protocol.
Each is a real SuperLink with SuperNodes as separate processes (deploy.launch); every
message runs in a ClientApp process of its own, forked by the warm server
(deploy/warm_clientapp.py, deploy.local's default): a SuperNode's stop or SIGKILL must
reach its ClientApp, and the server must outlive a SuperLink restart. The SuperNodes are
prompt ones (deploy/prompt_supernode.py, deploy.local's default: Flower's own SuperNode,
its idle waits capped at 0.2 s), so a stop, kill or restart is met by the SuperNode
whose pull loop is the one deploy.local runs. Slow (minutes). The
deployments where nothing goes wrong are in tests/test_deployment.py (a file of their
own so that pytest-xdist's per-file scheduling can run the two halves side by side).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.credentials import make_all
from deploy.launch import LocalSuperLink

pytestmark = pytest.mark.e2e

def test_a_superlink_restarted_with_its_database_keeps_the_authenticated_federation(tmp_path):
    """docs/deployment.md's --database: a SuperLink with TLS and SuperNode authentication
    keeps the registered keys in its SQLite file; restarted on the same port and file, the
    same two SuperNode processes (never restarted) reconnect and a second run completes
    with both, its ClientApps still forked by the warm server, which outlives the restart.
    (Without a database the keys are forgotten and the nodes die with a 401.)"""
    files = make_all(tmp_path / "credentials", nodes=2)
    link = LocalSuperLink(tmp_path, simulation=False, tls=files.root, node_auth=True,
                          database=tmp_path / "superlink.db", warm_clientapp=True,
                          supernode_pull_seconds=0.2).start()
    try:
        for pid in range(2):
            link.register_node(files.node_public_key(pid))
            link.add_supernode(pid, 2, private_key=files.node_key(pid))
        run = {"num-server-rounds": 1, "fraction-evaluate": 0.0,
               "results-dir": str(tmp_path / "results")}
        for name in ("before-restart", "after-restart"):
            proc = link.run({**run, "run-name": name}, timeout=900)
            path = tmp_path / "results" / name / "summary.json"
            assert path.exists(), proc.stdout[-3000:] + proc.stderr[-2000:]
            summary = json.loads(path.read_text())
            assert summary["status"] == "completed" and summary["num_nodes"] == 2, summary
            if name == "before-restart":
                link.restart()
        assert all(node.poll() is None for node in link.supernodes)  # never died
    finally:
        served = link.warm_requests()
        processes = [link.process, link.warm_process, *link.supernodes]
        link.stop()
    assert all(p.poll() is not None for p in processes)
    assert served == 2 * 2 * 2  # runs x nodes x (size query, train): none started cold


def test_a_supernode_stopped_mid_run_and_restarted_keeps_its_dp_spend(tmp_path):
    """3 SuperNodes with sample-level DP-SGD, each with a state-dir; min-train-nodes 2.
    SuperNode 2 is stopped (SIGTERM, as a device shutting down) once round 1 is recorded,
    and started again, same node config, once round 2 has been sent to the other two. The
    run completes; the results say how many nodes took part in each round; the restarted
    node's accountant continues from its state-dir: its history holds exactly one entry
    per round it trained, so no round's spend is lost (a fresh accountant would hold only
    the rounds after restart)."""
    import threading
    import time

    from deploy.launch import _terminate_group
    from fl_app.privacy import NODE_SCOPE, accountant_file, steps_per_epoch

    rounds, run_name = 5, "stopped-node"
    link = LocalSuperLink(tmp_path, simulation=False, warm_clientapp=True,
                          supernode_pull_seconds=0.2).start()
    configs = [f'partition-id={pid} num-partitions=3 state-dir="{tmp_path / f"state-{pid}"}" '
               f'cache-dir="{tmp_path / "cache"}"' for pid in range(3)]
    summary_path = tmp_path / "results" / run_name / "summary.json"

    def recorded_rounds() -> int:
        try:
            return len(json.loads(summary_path.read_text())["history"]) - 1
        except (OSError, ValueError, KeyError):
            return -1

    outcome: dict = {}
    try:
        for pid in range(3):
            link.add_supernode(pid, 3, node_config=configs[pid])
        runner = threading.Thread(target=lambda: outcome.update(proc=link.run(
            {"num-server-rounds": rounds, "run-name": run_name, "min-train-nodes": 2,
             "results-dir": str(tmp_path / "results"), "dp": True, "dp-noise-multiplier": 1.1,
             "batch-size": 64}, timeout=900)))
        runner.start()
        while recorded_rounds() < 1 and runner.is_alive():
            time.sleep(0.2)
        _terminate_group(link.supernodes[2])
        # Restart once round 2 has been sent to the others (so it runs without node 2),
        # not once it is recorded: a cold SuperNode takes seconds to connect, and rounds
        # 3.. are short (a CI run under load once saw the restarted node miss them all).
        while (max(train_messages(link.supernode_log(p), "Receiving") for p in (0, 1)) < 2
               and runner.is_alive()):
            time.sleep(0.2)
        link.add_supernode(2, 3, node_config=configs[2])
        runner.join(timeout=900)
        summary = json.loads(summary_path.read_text())
    finally:
        processes = [link.process, link.warm_process, *link.supernodes]
        link.stop()
    assert all(p.poll() is not None for p in processes)
    proc = outcome.get("proc")
    assert summary["status"] == "completed", (summary.get("error"), proc and proc.stdout[-3000:])
    history = summary["history"][1:]
    valid = [r["replies_valid"] for r in history]
    assert valid[0] == 3 and valid[1] == 2, valid  # round 2 ran without the stopped node
    assert all(v >= 2 for v in valid) and all(r["round_aggregated"] == 1 for r in history)
    # Each node's accountant on disk ((sigma, q, steps) entries; Opacus merges equal
    # ones): the DP-SGD steps of every round the node trained, none missing.
    # A deployed node's accountant spans every run on its data (NODE_SCOPE); each entry
    # names the run it was spent in.
    run_tag = summary["run_name"]
    ledgers = {pid: json.loads(accountant_file(str(tmp_path / f"state-{pid}"), NODE_SCOPE, pid)
                               .read_text()) for pid in range(3)}
    assert all(set(ledger["runs"]) == {run_tag} for ledger in ledgers.values())
    steps = {pid: sum(k for _, _, k in ledger["history"]) for pid, ledger in ledgers.items()}
    per_round = [steps_per_epoch(n, 64) for n in summary["partition_train_sizes"]]
    assert steps[0] == rounds * per_round[0] and steps[1] == rounds * per_round[1], steps
    trained_by_2 = sum(v == 3 for v in valid)
    assert trained_by_2 >= 2, valid  # round 1, and at least one round after the restart
    assert steps[2] == trained_by_2 * per_round[2], (steps, valid)
    spends = [r["dp_epsilon_max"] for r in history]
    assert all(a < b for a, b in zip(spends, spends[1:])), spends


def train_messages(log: Path, direction: str) -> int:
    """How many train messages a SuperNode's log says it is ``direction`` ("Receiving"
    or "Sending"). Under SecAgg+ each protocol stage is one train message per node
    (setup, share keys, collect masked vectors, unmask); the run's first train
    message is round 1's setup (the node-directory queries before it are not train)."""
    text = log.read_text() if log.exists() else ""
    return text.count(f"{direction}: train message")


def test_a_supernode_killed_after_sharing_keys_leaves_the_survivors_sum(tmp_path):
    """4 SuperNodes under SecAgg+ (3 shares, threshold 2, min-train-nodes 3). SuperNode 3
    is SIGKILLed (its whole process group: the SuperNode and its ClientApp, as a device
    losing power) the moment its log shows it receiving its third train message, round
    1's collect-masked-vectors request: it has answered setup and share keys, so its
    neighbours hold shares of its pairwise-mask key and masked with it, and it never
    uploads. The round must still aggregate the 3 survivors' sum (their masks removed:
    the dead node's rebuilt from its neighbours' shares; the unmasked weight sum matches
    the survivors' plaintext num-examples, or the protocol fails the round). One round:
    a second (measured once: 3 survivors, 0 dropouts) adds ~80 s and nothing this test
    is about. The collect stage waits for the dead node until the
    SuperLink marks it offline (2 missed heartbeat intervals of 30 s: its error reply
    ends the wait), well before ``secagg-timeout``."""
    import os
    import signal
    import threading
    import time

    run_name, victim, survivors = "killed-after-share-keys", 3, (0, 1, 2)
    link = LocalSuperLink(tmp_path, simulation=False, warm_clientapp=True,
                          supernode_pull_seconds=0.2).start()
    started = time.monotonic()
    done, seen = threading.Event(), {}

    def kill_at_collect() -> None:
        """Kill the victim on its collect request; then time the survivors' uploads
        (their third reply) and the unmask requests (their fourth train message)."""
        while not done.is_set():
            now = time.monotonic()
            if "killed" not in seen and train_messages(link.supernode_log(victim),
                                                       "Receiving") >= 3:
                os.killpg(link.supernodes[victim].pid, signal.SIGKILL)
                seen["killed"] = now
            if "killed" in seen and "uploaded" not in seen and all(
                    train_messages(link.supernode_log(p), "Sending") >= 3 for p in survivors):
                seen["uploaded"] = now
            if "killed" in seen and any(
                    train_messages(link.supernode_log(p), "Receiving") >= 4 for p in survivors):
                seen["unmask"] = now
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_at_collect, daemon=True)
    try:
        for pid in range(4):
            link.add_supernode(pid, 4)
        watcher.start()
        proc = link.run({"num-server-rounds": 1, "run-name": run_name,
                         "results-dir": str(tmp_path / "results"), "secagg": True,
                         "secagg-num-shares": 3, "secagg-reconstruction-threshold": 2,
                         "secagg-timeout": 300.0, "min-train-nodes": 3,
                         "fraction-train": 1.0, "fraction-evaluate": 0.0}, timeout=900)
        done.set()
        watcher.join(timeout=10)
        path = tmp_path / "results" / run_name / "summary.json"
        assert path.exists(), proc.stdout[-3000:] + proc.stderr[-2000:]
        summary = json.loads(path.read_text())
        killed = link.supernodes[victim]
        killed.wait(timeout=30)
        victim_log = link.supernode_log(victim).read_text()
        (tmp_path / "flwr-run.log").write_text(proc.stdout + proc.stderr)
    finally:
        done.set()
        processes = [link.process, link.warm_process, *link.supernodes]
        link.stop()
    assert all(p.poll() is not None for p in processes)
    ended = time.monotonic()
    # The kill landed after share keys and before the upload: the victim received
    # round 1's third train message (collect) and answered only setup and share keys.
    assert "killed" in seen and killed.returncode == -signal.SIGKILL, seen
    assert train_messages(link.supernode_log(victim), "Receiving") == 3, victim_log[-3000:]
    assert train_messages(link.supernode_log(victim), "Sending") == 2, victim_log[-3000:]
    output = proc.stdout + proc.stderr
    assert summary["status"] == "completed", (summary.get("error"), output[-3000:])
    assert summary["num_nodes"] == 4
    (first,) = summary["history"][1:]
    # Round 1: the sum of exactly the 3 survivors, unmasked (a mask left in would fail
    # the weight cross-check or the range check: secagg_failed, round_aggregated 0).
    assert first["secagg_survivors"] == 3 and first["secagg_dropouts"] == 1, first
    assert first["secagg_malformed"] == 0 and "secagg_failed" not in first, first
    assert first["replies_valid"] == 3 and first["replies_rejected"] == 1, first
    assert first["round_aggregated"] == 1, first
    assert "the sum of 3 of 4 sampled nodes unmasked (1 dropped, 0 refused" in output, \
        output[-3000:]
    assert summary["final_test_accuracy"] > 0.5  # chance is 0.1: the sums were unmasked
    sizes = summary["partition_train_sizes"]
    print(f"\ntrain sizes {sizes}, survivors' {sum(sizes[p] for p in survivors)}; round "
          f"seconds {round(first['round_seconds'], 1)}; collect "
          f"waited {seen.get('unmask', ended) - seen.get('uploaded', ended):.0f} s for the "
          f"dead node after the survivors' uploads; test {ended - started:.0f} s; accuracy "
          f"{summary['final_test_accuracy']:.3f}")
