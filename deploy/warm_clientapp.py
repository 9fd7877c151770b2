"""A warm ClientApp launcher for Flower's deployment runtime: import once, fork per message.

    python -m deploy.warm_clientapp serve --socket /run/fl-app/warm.sock --shim-dir /run/fl-app/bin
    PATH=/run/fl-app/bin:$PATH flower-supernode ...

Flower 1.42's SuperNode hands every message to a new ``flwr-clientapp`` process: its
SuperExec starts the command by name from ``PATH`` (``flwr/supercore/superexec/executor/
subprocess_executor.py``: ``subprocess.Popen(["flwr-clientapp", "--runtime-api-address",
..., "--token", ...])``), and that process imports Python's, Flower's and PyTorch's
modules, handles one task and exits (``flwr/supernode/runtime/run_clientapp.py``). Those
imports are most of a deployed message's fixed cost (docs/deployment.md, "What a message
costs here": ``import torch`` ~3 s, Flower ~1.3 s, ``torch._dynamo`` ~1.5 s a message on
this project's machine). Nothing in Flower 1.42 keeps a ClientApp process warm.

This module keeps the *libraries* warm, not the app:

- ``serve`` (one process per machine, shared by every SuperNode on it) imports Flower's
  ClientApp runtime and the heavy libraries (PyTorch with ``torch._dynamo``, NumPy, Opacus,
  ``cryptography``), then listens on a Unix socket that only its own user may use (mode
  0600 and the peer's uid checked). It never imports the app: every message still
  installs and loads the app from its FAB, exactly as Flower does, so a new app version
  is picked up by the next message. It runs no PyTorch computation either, so no
  OpenMP/intra-op thread pool exists when it forks.
- ``install_shim`` writes a ``flwr-clientapp`` script (stdlib only, ``python -IS``,
  ~0.1 s) for the folder put first on the SuperNode's ``PATH``. The SuperExec starts it
  as it would Flower's; it sends its arguments, working folder, environment and standard
  streams (file descriptors, ``SCM_RIGHTS``) to the server, forwards the signals it gets
  to the child, and exits with the child's exit status (a child whose shim is killed
  dies with it). If the server does not answer, it ``exec``s Flower's real
  ``flwr-clientapp`` with the same arguments: a message is never lost to the warm path.
- Per request the server forks a child that takes the shim's streams, folder and
  environment, re-seeds what a fresh process would have seeded differently (NumPy's and
  PyTorch's global generators, from the OS; CPython re-seeds ``random`` itself), sets
  PyTorch's threads from ``OMP_NUM_THREADS`` when the SuperNode sets it (the libraries
  read it when they load, in the server), and runs Flower's own ``flwr_clientapp`` entry
  point with the shim's arguments. The child replies with its exit status and exits.

What it does not change: the message handling is Flower's, in a process of its own per
message (a crash, a ``SIGKILL`` or a memory leak stays in that child), with Flower's
``--parent-pid`` monitor watching the SuperExec as before. What differs from a fresh
process: the child's parent is the server, not the SuperExec, it runs in a session of its
own (``setsid``: the kernel's autogroup scheduler shares CPU time between sessions, so
every node's children in the server's one session would share one session's share), and
modules imported by the server are not re-imported (the same files in the same
environment).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from .prompt_supernode import (CLIENTAPP_MODULE, PULL_ENV, pull_seconds,
                               shorten_clientapp_retries, write_script)

# Imported once by the server. Libraries only: the app's own packages must come from each
# message's FAB (APP_PACKAGES are refused).
DEFAULT_PRELOAD = (
    "flwr.supernode.cli",
    "flwr.supernode.runtime.run_clientapp",
    "flwr.clientapp",
    "flwr.app",
    "numpy",
    "torch",
    "torch.nn",
    "torch.optim",
    "torch._dynamo",  # imported by torch.optim on a process's first optimizer (torch 2.13)
    "opacus",
    "cryptography.hazmat.primitives.ciphers",
    "cryptography.hazmat.primitives.asymmetric.x25519",
)
APP_PACKAGES = ("fl_app", "strategies", "partitions", "fl_common")  # the FAB's (pyproject fab-include)
DEFAULT_TARGET = "flwr.supernode.cli:flwr_clientapp"
HEADER = struct.Struct("!I")  # request length, sent with the shim's three descriptors
STATUS = struct.Struct("!i")  # the child's pid, then its exit status
MAX_REQUEST = 16 * 1024 * 1024
# In a forked child: the pid of the shim it serves (the process the SuperExec started),
# for logs and profiles (experiments/benchmark_message_profile.py); None elsewhere.
SHIM_PID: int | None = None
REQUEST_TIMEOUT = 10.0  # seconds for a shim to send its request

SHIM = '''#!{python} -IS
# flwr-clientapp for a warm ClientApp server (deploy/warm_clientapp.py); written by install_shim.
import json, os, socket, struct, sys
SOCKET = os.environ.get("FL_APP_WARM_SOCKET", {socket!r})
REAL = {real!r}
def cold():
    if not REAL or not os.path.exists(REAL):
        sys.stderr.write("warm flwr-clientapp: the server at %s did not answer and Flower's "
                         "flwr-clientapp (%r) is missing\\n" % (SOCKET, REAL))
        sys.exit(1)
    os.execv(REAL, [REAL] + sys.argv[1:])
try:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(SOCKET)
except OSError:
    cold()
request = json.dumps({{"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ),
                      "pid": os.getpid()}}).encode()
try:
    socket.send_fds(conn, [struct.pack("!I", len(request))], [0, 1, 2])
    conn.sendall(request)
except OSError:
    cold()  # nothing was forked for a request that did not arrive whole
def word():
    data = b""
    while len(data) < 4:
        try:
            chunk = conn.recv(4 - len(data))
        except InterruptedError:
            continue
        except OSError:  # reset: the server closed with the request unread
            return None
        if not chunk:
            return None
        data += chunk
    return struct.unpack("!i", data)[0]
child = word()  # the forked child's pid, then its exit status
if child is None:
    cold()  # refused, or the server died before forking: nothing ran, so run it cold
import signal
def forward(signum, frame):
    try:
        os.kill(child, signum)  # a signal to the SuperNode's process group reaches the child
    except OSError:
        pass
for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"):
    signal.signal(getattr(signal, name), forward)
status = word()
sys.exit(1 if status is None else status)
'''


def supported() -> bool:
    """The server needs Linux: the peer's uid (``SO_PEERCRED``) and a closed peer
    (``POLLRDHUP``) are read the Linux way."""
    return sys.platform.startswith("linux") and hasattr(select, "POLLRDHUP")


def real_clientapp() -> str:
    """Flower's ``flwr-clientapp`` of this interpreter's environment."""
    return str(Path(sys.executable).parent / "flwr-clientapp")


def install_shim(shim_dir: Path, socket_path: Path, real: str | None = None) -> Path:
    """Write ``shim_dir/flwr-clientapp`` (executable) for the server at ``socket_path``;
    ``real``: the command it falls back to (default: Flower's, beside this interpreter)."""
    shim_dir = Path(shim_dir)
    shim_dir.mkdir(parents=True, exist_ok=True)
    shim = shim_dir / "flwr-clientapp"
    real = real if real is not None else real_clientapp()
    if Path(real).resolve() == shim.resolve():
        raise ValueError(f"the shim's fallback {real} is the shim itself")
    write_script(shim, SHIM.format(python=sys.executable,
                                   socket=str(Path(socket_path).resolve()), real=real),
                 stat.S_IRWXU)
    return shim


def _resolve(target: str) -> Callable[[], object]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def preload(modules: Sequence[str]) -> list[str]:
    """Import ``modules``; refuse any that is, or brings in, the app's own code."""
    for name in modules:
        if name.split(".")[0] in APP_PACKAGES:
            raise ValueError(f"{name!r} is the app's code; it must come from each message's FAB")
        importlib.import_module(name)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in APP_PACKAGES)
    if loaded:
        raise RuntimeError(f"preloading imported the app's modules {loaded[:5]}: a message "
                           "would run them instead of its FAB's")
    return list(modules)


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise ConnectionError(f"request ended after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def _reseed_like_a_fresh_process() -> None:
    """A forked child inherits the server's generator states; a fresh process would have
    drawn new seeds. Every child draws its own from the OS, so two messages never share
    NumPy's or PyTorch's global stream (CPython re-seeds ``random`` after a fork itself)."""
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(None)
    if "torch" in sys.modules:
        sys.modules["torch"].seed()


def _die_with_the_shim(conn: socket.socket) -> None:
    """The child's life is tied to its shim's, as a process started by the SuperExec is to
    its process group: the shim forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to the child, and if
    the shim itself is gone (``SIGKILL``ed with the SuperNode's group: a device losing
    power), its end of the connection closes and the child is killed at once."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLRDHUP | select.POLLHUP)

    def watch() -> None:
        while True:
            for _, events in poller.poll():
                if events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                    os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="warm-clientapp-shim-watch", daemon=True).start()


def _prompt_object_pull() -> None:
    """Under a prompt SuperNode (``deploy/prompt_supernode.py``, whose cap the SuperNode's
    environment carries), the ClientApp's object pull retries after the same cap."""
    if os.environ.get(PULL_ENV) and CLIENTAPP_MODULE in sys.modules:
        try:
            shorten_clientapp_retries(sys.modules[CLIENTAPP_MODULE], pull_seconds())
        except ValueError:  # the SuperNode refused this value when it started
            pass


def _child(conn: socket.socket, fds: list[int], request: dict, target: str) -> int:
    """Runs in the forked child: become the shim's process, run ``target``, return its status."""
    # A session of its own, as a process the SuperExec starts is in its SuperNode's: Linux
    # shares CPU time between sessions first (autogroup scheduling, on by default), so
    # children left in the server's one session split one session's share between every
    # node's message (measured: the same training loop's CPU time, 1.4x the wall time
    # against a cold process's, under a grid's load; docs/deployment.md).
    os.setsid()
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
    conn.sendall(STATUS.pack(os.getpid()))  # the shim forwards its signals to this pid
    _die_with_the_shim(conn)
    for fd, std in zip(fds, (0, 1, 2)):
        os.dup2(fd, std)
    for fd in fds:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    global SHIM_PID
    SHIM_PID = request.get("pid") if isinstance(request.get("pid"), int) else None
    _reseed_like_a_fresh_process()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))
    _prompt_object_pull()
    try:
        _resolve(target)()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the status of whatever ended the task
        traceback.print_exc()
        code = 1
    return code


def _read_request(conn: socket.socket) -> tuple[list[int], dict] | None:
    """The shim's three descriptors and its request, or None (closing what arrived) for a
    peer of another user, a probe, or anything malformed."""
    fds: list[int] = []
    conn.settimeout(REQUEST_TIMEOUT)  # a stalled peer must not hold up every other message
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer_uid = struct.unpack("3i", creds)[1]
        if peer_uid != os.getuid():
            raise PermissionError(f"a request from uid {peer_uid}")
        header, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
        if not header and not fds:
            return None  # a probe: connected and closed
        if len(header) != HEADER.size or len(fds) != 3:
            raise ValueError(f"a header of {len(header)} bytes with {len(fds)} descriptors")
        (size,) = HEADER.unpack(header)
        if size > MAX_REQUEST:
            raise ValueError(f"a {size}-byte request (at most {MAX_REQUEST})")
        request = json.loads(_recv_exact(conn, size))
        if not (isinstance(request, dict) and isinstance(request.get("argv"), list)
                and isinstance(request.get("env"), dict) and isinstance(request.get("cwd"), str)
                and all(isinstance(a, str) for a in request["argv"])
                and all(isinstance(k, str) and isinstance(v, str)
                        for k, v in request["env"].items())):
            raise ValueError("a request without string argv, env and cwd")
        conn.settimeout(None)
        return fds, request
    except (OSError, ValueError, ConnectionError) as error:
        print(f"warm flwr-clientapp: refused {error}", file=sys.stderr, flush=True)
        for fd in fds:
            os.close(fd)
        return None


def serve(socket_path: Path, modules: Sequence[str] = DEFAULT_PRELOAD,
          target: str = DEFAULT_TARGET, max_requests: int | None = None) -> None:
    """Preload ``modules``, then fork one child per request on ``socket_path`` until
    stopped (SIGTERM/SIGINT) or ``max_requests`` were served. The socket is bound under a
    temporary name and renamed into place once listening, so a shim that finds the path
    finds a server."""
    if not supported():
        raise RuntimeError(f"the warm ClientApp server needs Linux (this is {sys.platform}); "
                           "run the SuperNode without it (Flower's own flwr-clientapp)")
    socket_path = Path(socket_path).resolve()
    if len(os.fsencode(str(socket_path))) > 100:
        raise ValueError(f"socket path {socket_path} is too long for a Unix socket "
                         "(at most 100 bytes here; the kernel's limit is 107)")
    preload(modules)
    _resolve(target)  # a wrong target fails here, not in every child
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = socket_path.with_name(f".{socket_path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(tmp))
    finally:
        os.umask(old_umask)
    listener.listen(64)
    os.replace(tmp, socket_path)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"warm flwr-clientapp: pid {os.getpid()} serving {socket_path}; preloaded "
          f"{len(modules)} modules", flush=True)
    served = 0
    try:
        while max_requests is None or served < max_requests:
            conn, _ = listener.accept()
            received = _read_request(conn)
            if received is None:
                conn.close()
                continue
            fds, request = received
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    listener.close()
                    code = _child(conn, fds, request, target)
                except BaseException:  # noqa: BLE001 - e.g. the shim's folder is gone
                    traceback.print_exc()
                finally:
                    try:
                        sys.stdout.flush()
                        sys.stderr.flush()
                    except Exception:  # noqa: BLE001 - the status must still be sent
                        pass
                    try:
                        conn.sendall(STATUS.pack(code))
                    except OSError:
                        pass
                    os._exit(code & 0xFF)
            for fd in fds:
                os.close(fd)
            conn.close()
            served += 1
            print(f"warm flwr-clientapp: request {served}: pid {pid}", flush=True)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        listener.close()
        try:
            if socket_path.exists() and stat.S_ISSOCK(socket_path.stat().st_mode):
                socket_path.unlink()
        except OSError:
            pass


def start_server(socket_path: Path, shim_dir: Path, args: Sequence[str] = (), *,
                 env: dict[str, str] | None = None, cwd: Path | None = None,
                 log=subprocess.DEVNULL, timeout: float = 120.0) -> subprocess.Popen:
    """Start ``python -m deploy.warm_clientapp serve`` (its shim written to ``shim_dir``)
    in a session of its own, and return once its socket is in place; a server that exits
    or is not listening within ``timeout`` is stopped and RuntimeError raised."""
    process = subprocess.Popen(
        [sys.executable, "-m", "deploy.warm_clientapp", "serve", "--socket", str(socket_path),
         "--shim-dir", str(shim_dir), *args],
        cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not Path(socket_path).exists():
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                process.kill()
            process.wait()
            raise RuntimeError(f"the warm ClientApp server did not start (exit status "
                               f"{process.returncode})")
        time.sleep(0.1)
    return process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="preload, write the shim, fork a child per message")
    run.add_argument("--socket", type=Path, required=True, help="the Unix socket to listen on")
    run.add_argument("--shim-dir", type=Path, default=None,
                     help="write the flwr-clientapp shim here (put it first on the SuperNode's PATH)")
    run.add_argument("--preload", nargs="*", default=None,
                     help=f"modules to import once (default: {' '.join(DEFAULT_PRELOAD)})")
    run.add_argument("--target", default=DEFAULT_TARGET, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # ``python -m`` put the launch folder first on sys.path; a fresh flwr-clientapp has not.
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]
    if args.shim_dir is not None:
        shim = install_shim(args.shim_dir, args.socket)
        print(f"warm flwr-clientapp: shim {shim}", flush=True)
    serve(args.socket, tuple(args.preload) if args.preload is not None else DEFAULT_PRELOAD,
          target=args.target)
    return 0


if __name__ == "__main__":
    # Run under the module's own name, so a child's ``deploy.warm_clientapp.SHIM_PID`` is set.
    from deploy import warm_clientapp

    raise SystemExit(warm_clientapp.main())
