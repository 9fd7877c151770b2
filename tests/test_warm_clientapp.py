"""The warm ClientApp server (deploy/warm_clientapp.py): a shim named ``flwr-clientapp``
hands each message to a server that imported Flower and PyTorch once and forks a child.

With a stand-in for Flower's entry point (tests/warm_probe.py), real processes and a real
socket: the child is the shim's process in every way a message can see (arguments,
folder, environment, streams, exit status, PyTorch's threads), two messages never share a
random stream, the app's code is never preloaded, the socket is private, a bad request or
a crashing child does not stop the server, and without a server the shim runs Flower's
own command. Then the deployment runtime with Flower's entry point: the same seeded run,
cold and warm, ends with the same model, and every message went through the server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.launch import REPO
from deploy.warm_clientapp import install_shim

PROBE = "tests.warm_probe:main"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A warm server with the probe as its target (NumPy and PyTorch preloaded), and its shim."""
    root = tmp_path_factory.mktemp("warm")
    sock = root / "s.sock"
    env = {**os.environ, "PYTHONPATH": str(REPO), "ONLY_IN_THE_SERVER": "1"}
    log = open(root / "server.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.warm_clientapp", "serve", "--socket", str(sock),
         "--shim-dir", str(root / "bin"), "--preload", "numpy", "torch", "--target", PROBE],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()
        time.sleep(0.1)
    yield {"proc": proc, "socket": sock, "shim": root / "bin" / "flwr-clientapp", "root": root}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def message(server, tmp_path, name: str, code: int = 0, *extra: str, env: dict | None = None):
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([str(server["shim"]), "--out", str(out), "--code", str(code), *extra],
                          cwd=tmp_path, env={"PATH": os.environ["PATH"], **(env or {})},
                          capture_output=True, text=True, timeout=120)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_the_forked_child_is_the_shims_process(server, tmp_path):
    """Arguments, working folder, environment (the shim's, not the server's), standard
    streams and exit status are the shim's; the child was forked by the server with
    PyTorch already imported and none of the app's modules."""
    proc, record = message(server, tmp_path, "one", 3, "--flag", env={"FOO": "bar"})
    assert proc.returncode == 3
    assert f"probe {record['pid']} on stdout" in proc.stdout
    assert f"probe {record['pid']} on stderr" in proc.stderr
    assert record["argv"][1:] == ["--out", str(tmp_path / "one.json"), "--code", "3", "--flag"]
    assert record["cwd"] == str(tmp_path)
    assert record["env"]["FOO"] == "bar" and "ONLY_IN_THE_SERVER" not in record["env"]
    assert record["ppid"] == server["proc"].pid  # forked by the server: the warm path
    assert record["torch_preloaded"] and record["app_loaded"] == []
    assert record["matmul"] == 256.0


def test_each_child_runs_in_a_session_of_its_own(server, tmp_path):
    """Linux shares CPU time between sessions before processes (autogroup scheduling):
    children left in the server's session would split one session's share between every
    node's message, where cold ClientApps each run in their own SuperNode's session. The
    warm loop measured 1.4x slower than the cold one for the same CPU time under load
    until each child called ``setsid``."""
    from tests.warm_probe import _autogroup

    records = [message(server, tmp_path, f"s{i}")[1] for i in range(2)]
    server_pid = server["proc"].pid
    for record in records:
        assert record["sid"] == record["pid"] != os.getsid(server_pid)
    groups = {r["autogroup"] for r in records}
    if _autogroup(str(server_pid)) is not None:  # a kernel with autogroup scheduling
        assert len(groups) == 2 and _autogroup(str(server_pid)) not in groups


def test_the_supernodes_thread_count_reaches_pytorch(server, tmp_path):
    """PyTorch read ``OMP_NUM_THREADS`` when the server imported it; the child applies the
    SuperNode's value, as a fresh process would have read it."""
    _, one = message(server, tmp_path, "t1", env={"OMP_NUM_THREADS": "1"})
    _, two = message(server, tmp_path, "t2", env={"OMP_NUM_THREADS": "2"})
    assert (one["threads"], two["threads"]) == (1, 2)


def test_two_messages_never_share_a_random_stream(server, tmp_path):
    """The attack: children of one server inherit its generator states, so every message
    would draw the same "random" numbers from NumPy's and PyTorch's global generators (a
    fresh process seeds them from the OS). Each child re-seeds them; CPython re-seeds
    ``random`` itself."""
    records = [message(server, tmp_path, f"r{i}")[1] for i in range(3)]
    for key in ("numpy", "torch", "random"):
        assert len({r[key] for r in records}) == 3, key


def test_a_crashing_child_fails_its_message_only(server, tmp_path):
    """A child that aborts (SIGABRT) fails its shim with a non-zero status; the next
    message is served."""
    proc, _ = message(server, tmp_path, "crash", 0, "--crash")
    assert proc.returncode != 0
    proc, record = message(server, tmp_path, "after-crash", 0)
    assert proc.returncode == 0 and record["ppid"] == server["proc"].pid


def _wait_for(path: Path, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_to_the_shim_reaches_the_child(server, tmp_path, signum):
    """A ClientApp started by the SuperExec lives in the SuperNode's process group; a
    forked child does not. So the shim forwards SIGTERM (the child's handler runs, as
    Flower's exit handler would), and a shim killed outright (SIGKILL with the group: a
    device losing power) takes its child with it within a second."""
    out = tmp_path / f"wait-{signum}.json"
    shim = subprocess.Popen([str(server["shim"]), "--out", str(out), "--code", "0", "--wait"],
                            cwd=tmp_path, env={"PATH": os.environ["PATH"]})
    child = int(_wait_for(Path(f"{out}.pid")))
    assert child != shim.pid and _alive(child)
    shim.send_signal(signum)
    shim.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    if signum == signal.SIGTERM:
        assert _wait_for(Path(f"{out}.term")) == str(int(signal.SIGTERM))
        assert shim.returncode == 143  # the child's status, relayed
    else:
        assert not Path(f"{out}.term").exists()


def test_bad_requests_are_refused_and_the_server_keeps_serving(server, tmp_path):
    """A probe (connect, close), a header without descriptors, an oversized length and a
    request that is not the shim's JSON are each refused; a real message still runs."""
    path = str(server["socket"])
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(path)
    with socket.socket(socket.AF_UNIX) as bare:
        bare.connect(path)
        bare.sendall(struct.pack("!I", 10) + b"0123456789")
    with open(os.devnull, "rb") as null:
        for header, body in ((struct.pack("!I", 1 << 30), b""),
                             (struct.pack("!I", 9), b"not json!"),
                             (struct.pack("!I", 4), b"[42]")):
            with socket.socket(socket.AF_UNIX) as bad:
                bad.connect(path)
                try:
                    socket.send_fds(bad, [header], [null.fileno()] * 3)
                    bad.sendall(body)
                    bad.shutdown(socket.SHUT_WR)
                    status = bad.recv(4)
                except (BrokenPipeError, ConnectionResetError):  # refused before the body
                    status = b""
                assert status == b""  # closed without running anything
    proc, record = message(server, tmp_path, "after-bad", 0)
    assert proc.returncode == 0 and record["ppid"] == server["proc"].pid
    log = (server["root"] / "server.log").read_text()
    assert log.count("warm flwr-clientapp: refused") >= 4


def test_the_socket_is_private(server):
    """Only the server's user may connect (mode 0600; the peer's uid is checked too)."""
    mode = stat.S_IMODE(os.stat(server["socket"]).st_mode)
    assert mode & 0o077 == 0, oct(mode)


def test_without_a_server_the_shim_runs_flowers_command(tmp_path):
    """No server at the socket: the shim execs its fallback (Flower's ``flwr-clientapp``
    in use; here a script) with the same arguments, and exits with its status."""
    fallback = tmp_path / "real-clientapp"
    fallback.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'ran'}\nexit 7\n")
    fallback.chmod(0o755)
    shim = install_shim(tmp_path / "bin", tmp_path / "nobody.sock", real=str(fallback))
    proc = subprocess.run([str(shim), "--token", "abc"], capture_output=True, timeout=30)
    assert proc.returncode == 7
    assert (tmp_path / "ran").read_text().split() == ["--token", "abc"]


def test_a_request_refused_before_the_fork_runs_cold(tmp_path):
    """A server that takes the request and closes without forking (it refused it, or died):
    nothing ran, so the shim runs Flower's command instead of failing the message."""
    import threading

    fallback = tmp_path / "real-clientapp"
    fallback.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'ran'}\nexit 0\n")
    fallback.chmod(0o755)
    path = tmp_path / "refusing.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def refuse() -> None:
        conn, _ = listener.accept()
        conn.recv(1 << 16)
        conn.close()
    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    shim = install_shim(tmp_path / "bin", path, real=str(fallback))
    proc = subprocess.run([str(shim), "--token", "xyz"], capture_output=True, timeout=30)
    thread.join(timeout=10)
    listener.close()
    assert proc.returncode == 0
    assert (tmp_path / "ran").read_text().split() == ["--token", "xyz"]


def test_preloading_refuses_the_apps_code():
    """A message must load the app from its FAB: the server refuses to import the app's
    packages, directly or through another module, before it serves."""
    def preload(modules: str) -> subprocess.CompletedProcess:
        code = f"from deploy.warm_clientapp import preload; preload({modules})"
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                              text=True, timeout=120)

    assert preload("['json']").returncode == 0
    direct = preload("['fl_app.config']")
    assert direct.returncode != 0 and "is the app's code" in direct.stderr
    indirect = preload("['tests.helpers']")  # imports fl_common and fl_app
    assert indirect.returncode != 0 and "imported the app's modules" in indirect.stderr


@pytest.mark.e2e
def test_a_deployed_run_is_the_same_cold_and_warm(tmp_path):
    """Two SuperNodes, digits, one seeded round with evaluation: every message in a fresh
    process (Flower's way), then every message forked by the warm server. The final
    model's test loss and accuracy are equal to the last digit, and every message of the
    warm run went through the server (3 a node: the size query, train, evaluate). Both halves
    run prompt SuperNodes (deploy.local's default): what differs is the ClientApp process
    alone."""
    from deploy.launch import LocalSuperLink

    results = {}
    for warm in (False, True):
        link = LocalSuperLink(tmp_path / f"warm-{warm}", simulation=False,
                              warm_clientapp=warm,
                              supernode_pull_seconds=0.2).start()
        try:
            for pid in range(2):
                link.add_supernode(pid, 2)
            name = f"run-{'warm' if warm else 'cold'}"
            proc = link.run({"num-server-rounds": 1, "run-name": name,
                             "results-dir": str(tmp_path / "results")}, timeout=600)
            path = tmp_path / "results" / name / "summary.json"
            assert path.exists(), proc.stdout[-3000:] + proc.stderr[-2000:]
            results[warm] = json.loads(path.read_text())
            served = link.warm_requests()
        finally:
            processes = [link.process, link.warm_process, *link.supernodes]
            link.stop()
        assert all(p is None or p.poll() is not None for p in processes)
        assert results[warm]["status"] == "completed", results[warm].get("error")
        assert served == (6 if warm else 0)
    cold, warm = results[False], results[True]
    assert warm["final_test_loss"] == cold["final_test_loss"]
    assert warm["final_test_accuracy"] == cold["final_test_accuracy"]
    assert [r.get("train_loss") for r in warm["history"]] == [r.get("train_loss") for r in cold["history"]]


def test_the_launcher_refuses_a_warm_server_for_simulation(tmp_path):
    """Simulation has no ClientApp processes to fork: asking for the warm server there is
    a mistake, named before anything starts."""
    from deploy.launch import LocalSuperLink

    with pytest.raises(ValueError, match="warm_clientapp is for the deployment runtime"):
        LocalSuperLink(tmp_path, simulation=True, warm_clientapp=True)
