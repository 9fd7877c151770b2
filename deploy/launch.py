"""Start a private local SuperLink and submit ``flwr run`` to it (tests, experiments, benchmarks).

Simulation by default; with ``simulation=False`` it is Flower's deployment runtime: a
SuperLink and separate ``flower-supernode`` processes (``add_supernode``), as on devices.

``flwr run .`` on the default ``local`` connection starts a detached SuperLink on fixed
ports that outlives the run, installs dependencies at run time unless told not to, and
resolves relative paths against its own working directory. For anything automated we
start our own ``flower-superlink --simulation`` on a free port, with runtime dependency
installation disabled, inside a throwaway ``FLWR_HOME``, and stop it (its whole process
group) when done.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .app_copy import copy_app
from .credentials import TLSFiles
from .prompt_supernode import PULL_ENV, check_seconds, install_launcher
from .warm_clientapp import start_server

REPO = Path(__file__).resolve().parent.parent
# Flower 1.42's SuperExec reads its task-polling interval from this variable (default 1 s,
# 0.01 to 60 allowed: flwr/supercore/superexec/run_superexec.py).
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_SECONDS = "0.2"


def executable(name: str) -> str:
    """A console script of this interpreter's environment (works without an activated venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def toml_value(value: Any) -> str:
    """A Python value as the TOML literal ``flwr run -c`` expects."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    raise TypeError(f"Run-config values must be bool, int, float or str; got {value!r}")


def run_config_arg(overrides: dict[str, Any]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())


def raise_keyboard_interrupt(signum, frame) -> None:  # noqa: ANN001 - a signal handler
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """Make SIGTERM (``timeout``, ``kill``) raise KeyboardInterrupt in the main thread, so
    that the ``finally``/``with`` blocks around a LocalSuperLink stop the processes it
    started (they run in their own sessions: with SIGTERM's default action they outlived
    a killed benchmark). Only where SIGTERM still has its default action."""
    import threading

    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        signal.signal(signal.SIGTERM, raise_keyboard_interrupt)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (a zombie, which only its parent
    can reap, does not count)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: any member, zombies included
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            return True
    return False


def _terminate_group(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM a process's session (it and every child that stayed in its group) and wait
    for the whole group, not only its leader; SIGKILL what is left after ``grace`` s. (A
    child that outlives its leader, e.g. the SuperLink's flwr-simulation and its Ray
    processes, was left running when only the leader was waited for.)"""
    pgid = process.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        process.poll()
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_alive(pgid):
        process.poll()  # reap the leader
        time.sleep(0.1)
    if time.monotonic() >= deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        # a SIGKILLed process takes a moment to exit: return only once the group is gone
        # (seen on CI: the child was still running just after the SIGKILL)
        killed_by = time.monotonic() + 10
        while time.monotonic() < killed_by and _group_alive(pgid):
            process.poll()
            time.sleep(0.05)
    try:  # the leader is reaped before this returns (a SIGKILL takes a moment)
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


class LocalSuperLink:
    """A SuperLink of our own: ``with LocalSuperLink(workdir) as link: link.run(...)``."""

    def __init__(self, workdir: Path, log_path: Path | None = None, simulation: bool = True,
                 tls: Path | None = None, node_auth: bool = False,
                 extra_env: dict[str, str] | None = None,
                 supernode_threads: int | None = 1, database: Path | None = None,
                 warm_clientapp: bool = False, warm_args: list[str] | None = None,
                 supernode_pull_seconds: float | None = None) -> None:
        """``tls``: a credentials folder (``deploy/credentials.py``): the SuperLink serves
        TLS with its certificate, the CLI and the SuperNodes verify it with its CA.
        ``node_auth``: only SuperNodes whose public key was registered
        (``register_node``) may connect (Flower requires TLS for it). ``extra_env``: set
        last in every process's environment (the SuperLink, the SuperNodes and their
        ClientApp processes, ``flwr run``): a profiler's wrapper first on ``PATH``.
        ``supernode_threads``: ``OMP_NUM_THREADS`` for the SuperNodes (so for PyTorch in
        every ClientApp process they start) unless the environment sets it; 1 by default,
        as each simulated client gets one CPU (``run``'s ``num_cpus``): SuperNodes sharing
        this machine's cores, each with PyTorch's default of one thread per core,
        oversubscribe them (docs/deployment.md, "What a message costs"). None: PyTorch's
        default, or the app's node-config ``num-threads`` (fl_app/node_runtime.py).
        ``database``: the SuperLink keeps its state (registered SuperNode keys, runs) in
        this SQLite file (``--database``), so that ``restart()`` keeps the federation.
        ``warm_clientapp`` (deployment only): the SuperNodes' ClientApp processes are
        forked by one warm server that imported Flower and PyTorch once
        (``deploy/warm_clientapp.py``), instead of each starting from nothing;
        ``warm_args``: more arguments for its ``serve`` (a profiler's ``--target``).
        ``supernode_pull_seconds`` (deployment only): the SuperNodes wait at most this long
        between pulls and reply checks instead of Flower's hard-coded 3 s / 0.5 s
        (``deploy/prompt_supernode.py``); None: Flower's ``flower-supernode`` as it is."""
        if node_auth and tls is None:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses it without)")
        self.workdir = Path(workdir)
        self.simulation = simulation
        self.tls = TLSFiles(Path(tls)) if tls is not None else None
        self.node_auth = node_auth
        self.supernodes: list[subprocess.Popen] = []
        self.port = free_port()
        self.home = Path(tempfile.mkdtemp(prefix="flwr-home-"))
        self.log_path = log_path or self.home / "superlink.log"
        self.process: subprocess.Popen | None = None
        self.extra_env = dict(extra_env or {})
        self.supernode_threads = supernode_threads
        self.database = Path(database) if database is not None else None
        if warm_clientapp and simulation:
            raise ValueError("warm_clientapp is for the deployment runtime (simulation has no "
                             "ClientApp processes)")
        self.warm_clientapp = warm_clientapp
        self.warm_args = list(warm_args or [])
        self.warm_process: subprocess.Popen | None = None
        self.warm_socket = self.home / "warm" / "clientapp.sock"
        self.warm_log = self.home / "warm-clientapp.log"
        if supernode_pull_seconds is not None:
            if simulation:
                raise ValueError("supernode_pull_seconds is for the deployment runtime "
                                 "(simulation has no SuperNode processes)")
            check_seconds(supernode_pull_seconds, "supernode_pull_seconds")  # refused now
        self.supernode_pull_seconds = supernode_pull_seconds
        self._launcher: Path | None = None  # the prompt SuperNode's script, installed once

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        bin_dir = str(Path(sys.executable).parent)
        env.update({
            "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_DATASETS_OFFLINE": env.get("HF_DATASETS_OFFLINE", "1"),
            "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "FL_APP_WORKDIR": str(self.workdir),
        })
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 60.0) -> "LocalSuperLink":
        stop_on_sigterm()
        self.workdir.mkdir(parents=True, exist_ok=True)
        security = (f'root-certificates = "{self.tls.ca_cert.resolve()}"\n' if self.tls
                    else "insecure = true\n")
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "private"\n\n[superlink.private]\n'
            f'address = "127.0.0.1:{self.port}"\n{security}'
        )
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed with the process)
        mode = ["--simulation"] if self.simulation else []
        if self.tls:
            mode += ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile",
                     str(self.tls.server_cert), "--ssl-keyfile", str(self.tls.server_key)]
        else:
            mode += ["--insecure"]
        if self.node_auth:
            mode += ["--enable-supernode-auth"]
        if self.database is not None:
            mode += ["--database", str(self.database)]
        if self.warm_clientapp and self.warm_process is None:
            self._start_warm_clientapp(timeout)
        self.process = subprocess.Popen(
            [executable("flower-superlink"), *mode,
             "--disable-runtime-dependency-installation", "--port", str(self.port)],
            cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited early; see {self.log_path}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"flower-superlink did not listen on {self.port} within {timeout}s")

    def _start_warm_clientapp(self, timeout: float) -> None:
        """The warm ClientApp server (``python -m deploy.warm_clientapp serve``), with its
        ``flwr-clientapp`` shim written to ``<home>/warm-bin``, which ``supernode_env`` puts
        first on the SuperNodes' ``PATH``. Waits until its socket is in place."""
        with open(self.warm_log, "ab") as log:  # the server holds its own descriptor
            try:
                self.warm_process = start_server(
                    self.warm_socket, self.home / "warm-bin", self.warm_args, cwd=REPO,
                    env=self.supernode_env(warm=False), log=log, timeout=timeout)
            except RuntimeError as err:
                self.stop()
                raise RuntimeError(f"{err}; see {self.warm_log}") from None

    def warm_requests(self) -> int:
        """Messages the warm server has forked a ClientApp for so far (from its log)."""
        if not self.warm_log.exists():
            return 0
        return self.warm_log.read_text(errors="replace").count("warm flwr-clientapp: request ")

    def register_node(self, public_key: Path) -> subprocess.CompletedProcess:
        """``flwr supernode register <public key> private``: allow that SuperNode in."""
        proc = subprocess.run([executable("flwr"), "supernode", "register", str(public_key),
                               "private"], env=self.env, cwd=self.workdir, capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"flwr supernode register {public_key} failed: "
                               f"{proc.stdout[-2000:]} {proc.stderr[-2000:]}")
        return proc

    def supernode_env(self, warm: bool = True) -> dict[str, str]:
        """A SuperNode's environment (inherited by its SuperExec and ClientApp processes):
        ``env``, with ``OMP_NUM_THREADS`` = ``supernode_threads`` unless already set, and
        the SuperExec's task poll at ``SUPEREXEC_POLL_SECONDS`` unless already set (its
        default, 1 s, is on average half a second of every message's latency); with the
        warm ClientApp server, its shim's folder first on ``PATH``."""
        env = self.env
        if warm and self.warm_clientapp:
            env["PATH"] = str(self.home / "warm-bin") + os.pathsep + env["PATH"]
        if self.supernode_threads is not None and not env.get("OMP_NUM_THREADS"):
            env["OMP_NUM_THREADS"] = str(int(self.supernode_threads))
        env.setdefault(SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_SECONDS)
        return env

    def supernode_log(self, index: int) -> Path:
        return self.home / f"supernode-{index}.log"

    def add_supernode(self, partition_id: int, num_partitions: int, node_config: str = "",
                      private_key: Path | None = None) -> subprocess.Popen:
        """Start a ``flower-supernode`` process holding one partition (deployment only);
        with ``private_key``, it authenticates with that key."""
        if self.simulation:
            raise RuntimeError("SuperNodes are started by the simulation engine in simulation mode")
        config = node_config or f"partition-id={partition_id} num-partitions={num_partitions}"
        log = open(self.supernode_log(len(self.supernodes)), "ab")  # noqa: SIM115
        env = self.supernode_env()
        security = (["--root-certificates", str(self.tls.ca_cert)] if self.tls else ["--insecure"])
        if private_key is not None:
            security += ["--auth-supernode-private-key", str(private_key)]
        command = [executable("flower-supernode")]
        if self.supernode_pull_seconds is not None:
            env[PULL_ENV] = str(self.supernode_pull_seconds)
            if self._launcher is None:
                self._launcher = install_launcher(self.home / "supernode-bin")
            command = [sys.executable, str(self._launcher)]
        self.supernodes.append(subprocess.Popen(
            [*command, *security, "--superlink", f"127.0.0.1:{self.port}",
             "--port", str(free_port()), "--node-config", config],
            cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        ))
        return self.supernodes[-1]

    def run(
        self,
        overrides: dict[str, Any],
        *,
        num_supernodes: int | None = None,
        num_cpus: float = 1,
        app: Path = REPO,
        timeout: float = 3600,
        output: Path | str | None = None,
    ) -> subprocess.CompletedProcess:
        """``flwr run <app> private --stream`` with run-config (and, in simulation,
        federation) overrides. ``output``: None captures stdout and stderr, a path appends
        them to that file, "-" streams them to this process's stdout. ``flwr run`` is
        given a copy of ``app``'s FAB files (``deploy/app_copy.py``): the same FAB, byte
        for byte, without Flower listing every file of a ``.venv`` inside ``app`` first."""
        with tempfile.TemporaryDirectory(prefix="app-", dir=self.home) as folder:
            return self._run(copy_app(app, Path(folder) / "app"), overrides,
                             num_supernodes=num_supernodes, num_cpus=num_cpus,
                             timeout=timeout, output=output)

    def _run(self, app: Path, overrides: dict[str, Any], *, num_supernodes: int | None,
             num_cpus: float, timeout: float, output: Path | str | None,
             ) -> subprocess.CompletedProcess:
        cmd = [executable("flwr"), "run", str(app), "private", "--stream"]
        if self.simulation:
            if num_supernodes is None:
                raise ValueError("num_supernodes is required in simulation")
            cmd += ["--federation-config",
                    f"num-supernodes={num_supernodes} client-resources-num-cpus={num_cpus:g}"]
        if overrides:
            cmd += ["--run-config", run_config_arg(overrides)]
        if output == "-":  # stream to this process's stdout
            return subprocess.run(cmd, env=self.env, cwd=self.workdir, text=True, timeout=timeout)
        if output is None:
            return subprocess.run(cmd, env=self.env, cwd=self.workdir, capture_output=True,
                                  text=True, timeout=timeout)
        with open(output, "a") as handle:  # append: a grid completed over several sittings keeps every log
            return subprocess.run(cmd, env=self.env, cwd=self.workdir, stdout=handle,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout)

    def restart(self, timeout: float = 60.0) -> "LocalSuperLink":
        """Stop the SuperLink process only (its SuperNodes keep running) and start it again
        on the same port, with the same ``database``."""
        if self.process is not None:
            _terminate_group(self.process)
        return self.start(timeout)

    def stop(self) -> None:
        for node in self.supernodes:
            _terminate_group(node)
        self.supernodes = []
        if self.process is not None:
            _terminate_group(self.process)
        self.process = None
        if self.warm_process is not None:
            _terminate_group(self.warm_process)
        self.warm_process = None

    def __enter__(self) -> "LocalSuperLink":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
