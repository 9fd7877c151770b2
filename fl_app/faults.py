"""Faulty clients: a TEST FACILITY for the server's defences (simulation only).

Off by default (``fault-rate = 0``, ``fault-kind = "none"``) and refused outside
simulation. In every round each sampled client is faulty with probability
``fault-rate``, drawn from ``(seed, round, partition)`` alone (``is_faulty``), so a run
is reproducible and the server, or a test, can tell which replies were faulty. A faulty
client of kind

- ``exception``: raises in its ClientApp (Flower sends the server an error reply);
- ``timeout``: trains, but replies ``round-timeout`` + 2 seconds late (the server has
  stopped waiting: the reply is missing from the round);
- ``nan``: replies with NaN in its first array;
- ``shapes``: replies with its first array one row short;
- ``huge-examples``: claims 10^9 training examples (over any bound the server keeps).

The faults are injected by ``fault_mod``, the innermost mod of the ClientApp's train
handler (so SecAgg+ and user-level DP's clipping see the faulty reply as the server
would), which leaves the handler itself free of them.

The server (``strategies/guard.py``) leaves each such reply out with the reason logged,
counts them per round (``replies_rejected``, ``replies_missing``), and aggregates when
at least ``min-train-nodes`` valid replies remain; otherwise the model stays as it was.
"""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fl_common import wire

from .assignment import AssignmentRefused, partition_id as node_partition_id

FAULT_KINDS = ("none", "exception", "timeout", "nan", "shapes", "huge-examples")
FAULT_TAG = 0xFA17  # separates the fault draw from every other use of `seed`
HUGE_NUM_EXAMPLES = 10**9


class InjectedFault(RuntimeError):
    """Raised by a client of fault kind ``exception``."""


def is_faulty(seed: int, server_round: int, partition_id: int, rate: float) -> bool:
    """Whether this partition's client is faulty in this round (the same answer everywhere)."""
    if rate <= 0:
        return False
    draw = np.random.default_rng([int(seed), int(server_round), int(partition_id), FAULT_TAG])
    return bool(draw.random() < rate)


def corrupt_arrays(kind: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reply's arrays as a ``nan`` or ``shapes`` fault sends them (others: unchanged)."""
    out = dict(arrays)
    first = next(iter(out))
    if kind == "nan":
        bad = out[first].astype(out[first].dtype, copy=True)
        bad.reshape(-1)[0] = np.nan
        out[first] = bad
    elif kind == "shapes":
        out[first] = np.ascontiguousarray(out[first][:-1])
    return out


def _fault_of(msg: Message, context: Context) -> tuple[str | None, dict]:
    """This train message's fault kind (None: not faulty) and its run config's keys."""
    config = msg.content.get(wire.CONFIG) if msg.metadata.message_type == MessageType.TRAIN else None
    if config is None or wire.RUN_CONFIG not in config:
        return None, {}
    run = json.loads(str(config[wire.RUN_CONFIG]))
    kind, rate = run.get("fault-kind", "none"), float(run.get("fault-rate", 0.0))
    if kind == "none" or rate <= 0:
        return None, run
    try:  # the handler's partition (in simulation the server's assignment)
        pid = node_partition_id(context, msg)
    except AssignmentRefused:
        return None, run  # outside simulation: the handler refuses the message
    faulty = is_faulty(int(run["seed"]), int(config[wire.SERVER_ROUND]), pid, rate)
    return (kind if faulty else None), run


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Make this client's train reply faulty when ``is_faulty`` says so (see above)."""
    kind, run = _fault_of(msg, context)
    if kind is None:
        return call_next(msg, context)
    if kind == "exception":
        raise InjectedFault(f"fault-kind = exception (test facility): partition "
                            f"{node_partition_id(context, msg)} fails in round "
                            f"{msg.content[wire.CONFIG][wire.SERVER_ROUND]}")
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if kind in ("nan", "shapes"):
        record = reply.content[wire.ARRAYS]
        bad = corrupt_arrays(kind, {k: a.numpy() for k, a in record.items()})
        reply.content[wire.ARRAYS] = ArrayRecord({k: Array(v) for k, v in bad.items()})
    elif kind == "huge-examples":
        reply.content[wire.METRICS][wire.NUM_EXAMPLES] = HUGE_NUM_EXAMPLES
    elif kind == "timeout":  # the server stops waiting after round-timeout seconds
        time.sleep(float(run["round-timeout"]) + 2.0)
    return reply
