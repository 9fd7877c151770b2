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

The server (``strategies/guard.py``) leaves each such reply out with the reason logged,
counts them per round (``replies_rejected``, ``replies_missing``), and aggregates when
at least ``min-train-nodes`` valid replies remain; otherwise the model stays as it was.
"""

from __future__ import annotations

import numpy as np

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
