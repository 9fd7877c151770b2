"""The ClientApp process's runtime on a deployed node: PyTorch's threads from the node's cores.

Flower 1.42's SuperNode runs every message's ClientApp in a fresh ``flwr-clientapp``
process (``flwr/supernode/runtime/run_clientapp.py`` handles one task and exits), and
PyTorch starts each process with as many intra-op threads as the machine has cores.
Where several SuperNodes share a machine (a test, a benchmark, a gateway serving
several devices), their ClientApps then run ``nodes x cores`` busy threads on ``cores``
cores, and a small model's training loop, a barrier every operator, slows down by an
order of magnitude (measured: docs/benchmarks/deployment_profile.jsonl). In simulation
Ray gives every actor ``OMP_NUM_THREADS`` = its CPUs, so this never showed there.

``node_runtime_mod`` (a Flower client mod, for ``@app.train`` and ``@app.evaluate``)
sets the thread count before the handler touches PyTorch, from, in order:

1. node config ``num-threads`` (an integer >= 1, or ``"auto"``): the operator's choice;
2. the ``OMP_NUM_THREADS`` environment variable of the SuperNode, if set;
3. ``auto``: the cores this process may use (``os.sched_getaffinity``: a SuperNode
   started with ``taskset`` or in a container with a CPU set gets those), divided by
   the SuperNodes running on this machine that may use the same cores (one on a real
   device: all its cores), at least 1.

Inside Flower's simulation engine it changes nothing unless the node config names
``num-threads`` (Ray has already set each actor's threads from its resources).
Inter-op threads are set to 1 (the app's models run one operator at a time) where the
process still allows it (PyTorch allows it once, before any parallel work).
"""

from __future__ import annotations

import os
from typing import Mapping

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

NUM_THREADS = "num-threads"  # node-config key
SUPERNODE_COMMAND = "flower-supernode"


def usable_cores() -> int:
    """How many cores this process may run on (its affinity mask; else the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def local_supernodes(cores: set[int] | None = None) -> int:
    """SuperNode processes on this machine whose allowed cores overlap ``cores`` (default:
    this process's), from ``/proc``; 0 where ``/proc`` is not readable."""
    if cores is None:
        try:
            cores = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = set()
    count = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if not any(os.path.basename(a.decode(errors="replace")) == SUPERNODE_COMMAND
                   for a in argv[:2]):
            continue
        try:
            theirs = set(os.sched_getaffinity(int(entry)))
        except (AttributeError, OSError):
            theirs = set()
        if not cores or not theirs or cores & theirs:
            count += 1
    return count


def node_threads(node_config: Mapping, environ: Mapping[str, str] | None = None) -> int:
    """The intra-op thread count for this node's ClientApp (see the module docstring)."""
    environ = os.environ if environ is None else environ
    value = str(node_config.get(NUM_THREADS, "auto")).strip()
    if value != "auto":
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"Node config '{NUM_THREADS}' must be an integer >= 1 or "
                             f"\"auto\"; got {value!r}")
        return threads
    env = str(environ.get("OMP_NUM_THREADS", "")).strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return max(1, usable_cores() // max(1, local_supernodes()))


def apply_threads(threads: int) -> int:
    """Set PyTorch's intra-op threads (and inter-op to 1 where still allowed); returns
    the count PyTorch reports."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != 1:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # parallel work already ran in this process
            pass
    return torch.get_num_threads()


def configure_process(node_config: Mapping, simulation: bool | None = None) -> int | None:
    """Apply ``node_threads`` to this process; in simulation only an explicit
    ``num-threads`` (returns None where nothing was changed)."""
    if simulation is None:
        from .privacy_policy import in_simulation

        simulation = in_simulation()
    if simulation and NUM_THREADS not in node_config:
        return None
    return apply_threads(node_threads(node_config))


def node_runtime_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: this node's threads set (``configure_process``), then the handler.
    List it first in ``mods=[...]`` so that it runs before any other mod uses PyTorch."""
    configure_process(context.node_config)
    return call_next(msg, context)
