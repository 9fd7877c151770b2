"""deploy/launch.py: a SIGTERMed script stops the SuperLink it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone
    except OSError:
        return False


def test_sigterm_stops_the_superlink_a_script_started(tmp_path):
    """The SuperLink runs in its own session, so SIGTERM's default action on the script
    (``timeout``, ``kill``) used to leave it running; now the script's ``with`` block stops it."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from deploy.launch import LocalSuperLink
        with LocalSuperLink(Path({str(tmp_path)!r}) / "link", simulation=False) as link:
            print(link.process.pid, flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        superlink = int(proc.stdout.readline())
        assert _alive(superlink)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
        deadline = time.monotonic() + 30
        while _alive(superlink) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(superlink), "the SuperLink outlived the SIGTERMed script"
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(superlink, signal.SIGKILL)
        except (ProcessLookupError, UnboundLocalError, PermissionError):
            pass


def test_supernodes_get_one_thread_and_a_short_task_poll_unless_told_otherwise(tmp_path, monkeypatch):
    """SuperNodes sharing this machine's cores: one PyTorch thread each by default (as a
    simulated client gets one CPU), the environment's OMP_NUM_THREADS if set, none with
    supernode_threads=None; the SuperExec's task poll 0.2 s unless the environment sets it."""
    from deploy.launch import SUPEREXEC_POLL_ENV, LocalSuperLink

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(SUPEREXEC_POLL_ENV, raising=False)
    env = LocalSuperLink(tmp_path, simulation=False).supernode_env()
    assert env["OMP_NUM_THREADS"] == "1" and env[SUPEREXEC_POLL_ENV] == "0.2"
    assert "OMP_NUM_THREADS" not in LocalSuperLink(tmp_path, simulation=False,
                                                   supernode_threads=None).supernode_env()
    assert LocalSuperLink(tmp_path, simulation=False,
                          supernode_threads=2).supernode_env()["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv(SUPEREXEC_POLL_ENV, "1.0")
    env = LocalSuperLink(tmp_path, simulation=False).supernode_env()
    assert env["OMP_NUM_THREADS"] == "3" and env[SUPEREXEC_POLL_ENV] == "1.0"
    env = LocalSuperLink(tmp_path, simulation=False, extra_env={"X_PROFILE": "1"}).supernode_env()
    assert env["X_PROFILE"] == "1"


def test_stopping_a_group_also_stops_a_child_that_outlives_its_leader():
    """The leader exits on SIGTERM at once; its child, in the same session, ignores
    SIGTERM (as a slow-to-exit flwr-simulation did after its SuperLink): waiting for the
    leader alone left the child running; the whole group is waited for, then killed."""
    from deploy.launch import _group_alive, _terminate_group

    child = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             "time.sleep(300)")
    leader = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; "
         f"p = subprocess.Popen([sys.executable, '-c', {child!r}]); print(p.pid, flush=True); "
         "time.sleep(300)"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    child_pid = int(leader.stdout.readline())
    time.sleep(0.5)  # the child has set its handler
    started = time.monotonic()
    _terminate_group(leader, grace=2.0)
    assert 2.0 <= time.monotonic() - started < 10  # it waited for the child, then killed it
    assert leader.poll() is not None and not _group_alive(leader.pid)
    assert not _alive(child_pid)
