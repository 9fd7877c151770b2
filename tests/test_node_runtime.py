"""fl_app/node_runtime.py: PyTorch's threads in a deployed ClientApp process.

The unit tests check the rule (node config, then OMP_NUM_THREADS, then the usable cores
shared among this machine's SuperNodes); the e2e test starts a real SuperLink and two
real SuperNodes on free ports and asks each node's fresh ``flwr-clientapp`` process, in a
tiny app whose query handler sits behind ``node_runtime_mod``, what PyTorch reports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fl_app import node_runtime
from fl_app.node_runtime import NUM_THREADS, node_threads

REPO = Path(__file__).resolve().parent.parent


def test_the_node_config_key_wins_then_the_environment_then_the_cores(monkeypatch):
    monkeypatch.setattr(node_runtime, "usable_cores", lambda: 8)
    monkeypatch.setattr(node_runtime, "local_supernodes", lambda cores=None: 2)
    assert node_threads({NUM_THREADS: 3}, {"OMP_NUM_THREADS": "5"}) == 3
    assert node_threads({NUM_THREADS: "3"}, {}) == 3
    assert node_threads({}, {"OMP_NUM_THREADS": "5"}) == 5
    assert node_threads({NUM_THREADS: "auto"}, {"OMP_NUM_THREADS": "5"}) == 5
    assert node_threads({}, {}) == 4  # 8 usable cores, 2 SuperNodes on them
    monkeypatch.setattr(node_runtime, "local_supernodes", lambda cores=None: 0)
    assert node_threads({}, {}) == 8  # no SuperNode seen (not started by one): all
    monkeypatch.setattr(node_runtime, "local_supernodes", lambda cores=None: 16)
    assert node_threads({}, {"OMP_NUM_THREADS": ""}) == 1  # never below one


@pytest.mark.parametrize("bad", [0, -1, "two", "1.5", ""])
def test_a_bad_thread_count_is_refused_naming_the_key(bad):
    with pytest.raises(ValueError, match="num-threads"):
        node_threads({NUM_THREADS: bad}, {})


def test_the_usable_cores_follow_the_affinity_mask():
    """A process pinned to one core (``taskset``, a container's CPU set) gets 1."""
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux and two usable cores")
    code = ("import os; from fl_app.node_runtime import usable_cores; "
            "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); print(usable_cores())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    assert out.stdout.strip() == "1"


def test_supernodes_sharing_the_cores_are_counted():
    """A process named flower-supernode (a stand-in: a sleeping Python whose argv[0] is
    the SuperNode's console script name) is seen by local_supernodes."""
    before = node_runtime.local_supernodes()
    fake = subprocess.Popen(["bash", "-c", "exec -a flower-supernode sleep 30"])
    try:
        deadline = time.monotonic() + 10
        while node_runtime.local_supernodes() == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node_runtime.local_supernodes() == before + 1
    finally:
        fake.kill()
        fake.wait()


def test_simulation_is_left_alone_unless_the_key_is_set(monkeypatch):
    calls = []
    monkeypatch.setattr(node_runtime, "apply_threads", lambda n: calls.append(n) or n)
    assert node_runtime.configure_process({}, simulation=True) is None
    assert node_runtime.configure_process({NUM_THREADS: 1}, simulation=True) == 1
    assert node_runtime.configure_process({NUM_THREADS: 2}, simulation=False) == 2
    assert calls == [1, 2]


def test_the_mod_sets_the_threads_before_the_handler_runs(monkeypatch):
    import torch

    seen = {}
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr("fl_app.privacy_policy.in_simulation", lambda: False)

        class FakeContext:
            node_config = {NUM_THREADS: 1}

        node_runtime.node_runtime_mod(
            "msg", FakeContext(), lambda m, c: seen.update(threads=torch.get_num_threads()))
        assert seen["threads"] == 1
    finally:
        torch.set_num_threads(before)


CLIENT = '''
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from threads_app.node_runtime import node_runtime_mod

app = ClientApp()


@app.query(mods=[node_runtime_mod])
def query(msg, context):
    import torch

    return Message(RecordDict({"metrics": MetricRecord({
        "partition-id": int(context.node_config["partition-id"]),
        "threads": torch.get_num_threads(),
        "interop": torch.get_num_interop_threads()})}), reply_to=msg)
'''

SERVER = '''
import json
import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    out, nodes = str(context.run_config["out"]), int(context.run_config["nodes"])
    deadline = time.monotonic() + 120
    while len(ids := list(grid.get_node_ids())) < nodes and time.monotonic() < deadline:
        time.sleep(0.5)
    messages = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in ids]
    replies = grid.send_and_receive(messages, timeout=180)
    seen = {}
    for reply in replies:
        if reply.has_error():
            seen[str(reply.metadata.src_node_id)] = {"error": reply.error.reason}
        else:
            m = reply.content["metrics"]
            seen[str(int(m["partition-id"]))] = {"threads": int(m["threads"]),
                                                 "interop": int(m["interop"])}
    with open(out, "w") as handle:
        json.dump(seen, handle)
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "threads-app"
version = "0.1.0"
dependencies = []

[tool.setuptools.packages.find]
include = ["threads_app*"]

[tool.flwr.app]
publisher = "fl-app-tests"

[tool.flwr.app.components]
serverapp = "threads_app.server:app"
clientapp = "threads_app.client:app"

[tool.flwr.app.config]
out = ""
nodes = 2
'''


@pytest.mark.e2e
def test_real_clientapp_processes_run_with_the_threads_their_node_config_sets(tmp_path, monkeypatch):
    """Two SuperNodes on one machine: node 0's config sets num-threads = 1, node 1's
    none. Each node's ClientApp is a fresh flwr-clientapp process started by its
    SuperNode; PyTorch there reports 1 thread for node 0 and, for node 1, the usable cores
    divided among the (at least two) SuperNodes on them; inter-op threads 1 in both.
    Without the mod both would report PyTorch's default (every core)."""
    from deploy.launch import LocalSuperLink

    app = tmp_path / "app"
    package = app / "threads_app"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "client.py").write_text(textwrap.dedent(CLIENT))
    (package / "server.py").write_text(textwrap.dedent(SERVER))
    (app / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    # The module under test travels in the FAB, as it does in the real app.
    shutil.copy(REPO / "fl_app" / "node_runtime.py", package / "node_runtime.py")
    (package / "node_runtime.py").write_text((package / "node_runtime.py").read_text().replace(
        "from .privacy_policy import in_simulation", "in_simulation = lambda: False"))
    out = tmp_path / "threads.json"
    # No OMP_NUM_THREADS in the SuperNodes' environment: the rule's own default decides.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    link = LocalSuperLink(tmp_path / "link", simulation=False, supernode_threads=None)
    try:
        link.start()
        link.add_supernode(0, 2, node_config=f"partition-id=0 num-partitions=2 {NUM_THREADS}=1")
        link.add_supernode(1, 2, node_config="partition-id=1 num-partitions=2")
        proc = link.run({"out": str(out), "nodes": 2}, app=app, timeout=300)
    finally:
        processes = [link.process, *link.supernodes]
        link.stop()
    assert all(p.poll() is not None for p in processes)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = json.loads(out.read_text())
    cores = len(os.sched_getaffinity(0))
    assert seen["0"] == {"threads": 1, "interop": 1}, seen
    assert seen["1"]["interop"] == 1, seen
    assert 1 <= seen["1"]["threads"] <= max(1, cores // 2), seen
