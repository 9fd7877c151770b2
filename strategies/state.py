"""A strategy's state between rounds, captured for a checkpoint and restored on resume.

What a strategy carries from round to round differs by algorithm (FedAdam's moments m
and v, SCAFFOLD's c and its accepted map, FedAvgM's momentum, FedYogi's m_t and v_t,
user-level DP's release count), and Flower's built-ins keep theirs in plain attributes.
So the capture is generic: every attribute that is data (numbers, strings, NumPy arrays,
Flower records, and lists, tuples and dicts of those) is copied; an attribute that is
itself a strategy (a wrapper's inner strategy) is captured recursively; everything else
(callables, samplers, settings objects) is configuration that the resumed ServerApp
rebuilds from the same run config, and is left as built. ``restore`` writes the copies
back.

The capture is stored without pickle (``fl_app/checkpoint.py``): its structure and
scalars as typed JSON (each value tagged with its exact type, so tuples stay tuples and
SCAFFOLD's int-keyed accepted map keeps int keys), its arrays (NumPy arrays and scalars,
the bytes of Flower's ``Array``) in an npz loaded with ``allow_pickle=False``. Loading a
checkpoint therefore runs no code from it. Every type ``_SCALARS`` lists is one the
checkpoint can encode; a subclass of one (a namedtuple, an ``OrderedDict``) is captured
but refused by the save, loudly, rather than coming back as another type.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp.strategy import Strategy

_SCALARS = (type(None), bool, int, float, str, np.generic, np.ndarray, ArrayRecord,
            ConfigRecord, MetricRecord)
_STRATEGY, _VALUE = "strategy", "value"


def _is_data(value: Any) -> bool:
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _is_data(v) for k, v in value.items())
    return False


def capture(strategy: Strategy) -> dict[str, tuple[str, Any]]:
    """A deep copy of ``strategy``'s data attributes (and its inner strategies')."""
    state: dict[str, tuple[str, Any]] = {}
    for name, value in vars(strategy).items():
        if isinstance(value, Strategy):
            state[name] = (_STRATEGY, capture(value))
        elif _is_data(value):
            state[name] = (_VALUE, copy.deepcopy(value))
    return state


def restore(strategy: Strategy, state: dict[str, tuple[str, Any]]) -> None:
    """Write a ``capture`` back into a strategy built from the same run config."""
    for name, (kind, value) in state.items():
        if kind == _STRATEGY:
            inner = getattr(strategy, name, None)
            if not isinstance(inner, Strategy):
                raise ValueError(f"The checkpoint holds an inner strategy {name!r} that "
                                 f"{type(strategy).__name__} does not have")
            restore(inner, value)
        else:
            setattr(strategy, name, copy.deepcopy(value))
