"""A Ray cluster for Flower's simulation engine: a head and worker nodes (``ray start``).

On real machines (docs/deployment.md, "Simulation on a Ray cluster"):

    # on the head machine
    ray start --head --port 6379 --num-cpus <cores>
    # on every other machine (same Python environment, this app installed at the same path)
    ray start --address <head>:6379 --num-cpus <cores>
    # on the head: Flower's RayBackend calls ray.init(), which joins the cluster RAY_ADDRESS
    # names (else the one `ray start` recorded on this machine)
    RAY_ADDRESS=<head>:6379 flwr run . --stream --federation-config "num-supernodes=100 client-resources-num-cpus=1"

``RayCluster`` does the same on one machine for a test: a head and workers, each a
``ray start --block`` process in its own session with its own CPU count, under a private
temp folder (so no other ``ray.init()`` on this machine finds it), stopped by process
group (never ``ray stop``, which would stop every Ray instance of the machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .launch import _terminate_group, executable, free_port


class RayCluster:
    """``with RayCluster(nodes=2, cpus_per_node=1) as cluster: ...``; ``cluster.address``
    is what RAY_ADDRESS must say."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1,
                 env: dict[str, str] | None = None) -> None:
        """``env``: set in every node's environment (its workers, hence the ClientApp
        actors, inherit it), e.g. ``FL_APP_LOG_PLACEMENT=1``."""
        if nodes < 1 or cpus_per_node < 1:
            raise ValueError("a Ray cluster needs >= 1 node of >= 1 CPU")
        self.nodes, self.cpus = nodes, cpus_per_node
        # short: Ray's Unix sockets live under it (AF_UNIX paths are limited to 107 bytes)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: list[subprocess.Popen] = []
        self.env = dict(env or {})

    def _ray_start(self, *args: str, log: Path) -> subprocess.Popen:
        env = dict(os.environ)
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env.pop("RAY_ADDRESS", None)
        env.update(self.env)
        handle = open(log, "ab")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen([executable("ray"), "start", "--block", *args,
                                    "--num-cpus", str(self.cpus), "--disable-usage-stats"],
                                   env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append(process)
        return process

    def start(self, timeout: float = 120.0) -> "RayCluster":
        self._ray_start("--head", "--port", str(self.port), "--node-ip-address", "127.0.0.1",
                        "--include-dashboard", "false", "--temp-dir", str(self.temp_dir),
                        log=self.temp_dir / "head.log")
        self.wait_for(1, timeout)
        for i in range(1, self.nodes):
            self._ray_start("--address", self.address, "--node-ip-address", "127.0.0.1",
                            log=self.temp_dir / f"worker-{i}.log")
        self.wait_for(self.nodes, timeout)
        return self

    def alive_nodes(self) -> list[dict]:
        """The cluster's live nodes, from a separate process (ray.nodes())."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
                "print(json.dumps([{'id': n['NodeID'], 'cpus': n['Resources'].get('CPU', 0)} "
                "for n in ray.nodes() if n['Alive']]))" % self.address)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            return []
        return json.loads(done.stdout.strip().splitlines()[-1])

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.processes):
                raise RuntimeError(f"a `ray start` exited early; see {self.temp_dir}/*.log")
            if len(self.alive_nodes()) >= count:
                return
            time.sleep(2)
        raise RuntimeError(f"the Ray cluster did not reach {count} nodes in {timeout:.0f} s")

    def stop(self) -> None:
        for process in reversed(self.processes):  # workers first, the head last
            _terminate_group(process, grace=30.0)

    def __enter__(self) -> "RayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
