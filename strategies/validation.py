"""Reply validation shared by every strategy: a bad reply is left out, never averaged in.

A train reply is accepted only if it holds exactly one ArrayRecord whose keys, order,
shapes and dtypes equal what the server expects back (by default: what it sent), every
array value is finite, and exactly one MetricRecord whose ``num-examples`` is a finite
number > 0, at most the bound the server holds for that client (its partition's size
in simulation, else ``max-num-examples``), and whose other values are finite. Each
rejection carries its reason.

The bound matters: FedAvg's weights are n_i / sum_j n_j, so one reply claiming 1e12
examples would set the global model to its own weights, and claims near 1e308 overflow
the sum and turn the mean into zeros that pass every other check.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fl_app.wire import NUM_EXAMPLES


@dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype one array must have."""

    shape: tuple[int, ...]
    dtype: str


def array_spec(record: ArrayRecord) -> dict[str, ArraySpec]:
    """The ordered key -> (shape, dtype) layout of an ArrayRecord."""
    return {k: ArraySpec(tuple(a.shape), str(a.dtype)) for k, a in record.items()}


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of the serialized array data in a record."""
    return int(sum(len(a.data) for a in record.values()))


def check_arrays(record: ArrayRecord, expected: dict[str, ArraySpec]) -> str | None:
    """None if ``record`` matches ``expected`` and is finite, else the reason."""
    keys, want = list(record.keys()), list(expected.keys())
    if keys != want:
        missing = [k for k in want if k not in record]
        extra = [k for k in keys if k not in expected]
        if missing or extra:
            return f"array keys differ (missing {missing[:3]}, unexpected {extra[:3]})"
        return "array keys are in a different order"
    for key, array in record.items():
        spec = expected[key]
        if tuple(array.shape) != spec.shape:
            return f"array '{key}' has shape {tuple(array.shape)}, expected {spec.shape}"
        if str(array.dtype) != spec.dtype:
            return f"array '{key}' has dtype {array.dtype}, expected {spec.dtype}"
        values = array.numpy()
        if not np.all(np.isfinite(values)):
            return f"array '{key}' holds NaN or Inf"
    return None


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_metrics(record: MetricRecord, weighted_by_key: str = NUM_EXAMPLES,
                  max_weight: float | None = None) -> str | None:
    """None if the MetricRecord has a positive, finite weight (at most ``max_weight``)
    and finite values."""
    if weighted_by_key not in record:
        return f"metric '{weighted_by_key}' is missing"
    weight = record[weighted_by_key]
    if not _finite_number(weight) or weight <= 0:
        return f"metric '{weighted_by_key}' must be a finite number > 0, got {weight!r}"
    if max_weight is not None and weight > max_weight:
        return f"metric '{weighted_by_key}' = {weight!r} exceeds this client's bound {max_weight:g}"
    for key, value in record.items():
        values = value if isinstance(value, list) else [value]
        if not all(_finite_number(v) for v in values):
            return f"metric '{key}' is not finite"
    return None


def check_reply(
    content: RecordDict,
    expected_arrays: dict[str, ArraySpec] | None,
    weighted_by_key: str = NUM_EXAMPLES,
    max_weight: float | None = None,
) -> str | None:
    """None if a reply's content is valid; ``expected_arrays=None`` for evaluate replies."""
    if expected_arrays is not None:
        if len(content.array_records) != 1:
            return f"expected exactly one ArrayRecord, got {len(content.array_records)}"
        problem = check_arrays(next(iter(content.array_records.values())), expected_arrays)
        if problem:
            return problem
    if len(content.metric_records) != 1:
        return f"expected exactly one MetricRecord, got {len(content.metric_records)}"
    return check_metrics(next(iter(content.metric_records.values())), weighted_by_key, max_weight)


def split_replies(
    replies: Iterable[Message],
    expected_arrays: dict[str, ArraySpec] | None,
    weighted_by_key: str = NUM_EXAMPLES,
    max_weight: Callable[[Message], float | None] | None = None,
) -> tuple[list[Message], list[tuple[Message, str]]]:
    """(valid replies, [(rejected reply, reason)]).

    ``max_weight(reply)`` is the largest ``weighted_by_key`` value accepted from that
    reply's sender (None: no bound).

    Replies must also agree on their metric keys (Flower's aggregation needs it); the
    most common key set wins, and a reply with another set is rejected.
    """
    valid: list[Message] = []
    rejected: list[tuple[Message, str]] = []
    for msg in replies:
        if msg.has_error():
            rejected.append((msg, f"client error: {msg.error.reason}"))
            continue
        bound = max_weight(msg) if max_weight is not None else None
        problem = check_reply(msg.content, expected_arrays, weighted_by_key, bound)
        if problem:
            rejected.append((msg, problem))
        else:
            valid.append(msg)
    if valid:
        key_sets = [frozenset(next(iter(m.content.metric_records.values())).keys()) for m in valid]
        majority = Counter(key_sets).most_common(1)[0][0]
        kept = []
        for msg, keys in zip(valid, key_sets):
            if keys == majority:
                kept.append(msg)
            else:
                rejected.append((msg, f"metric keys {sorted(keys)} differ from {sorted(majority)}"))
        valid = kept
    return valid, rejected


def cast_like(record: ArrayRecord, expected: dict[str, ArraySpec]) -> ArrayRecord:
    """``record`` with each floating-point array cast to the dtype of ``expected``.

    Flower's FedOpt family (FedAdam, FedYogi, FedAdagrad) returns float64 arrays for a
    float32 model; without the cast every such aggregate would be discarded as a layout
    mismatch. Arrays whose key or shape differ, or that are not floating point, are left
    alone (``check_arrays`` then says what is wrong); a value beyond the target dtype's
    range becomes Inf, which ``check_arrays`` rejects.
    """
    if list(record.keys()) != list(expected.keys()):
        return record
    out = {}
    for key, array in record.items():
        spec = expected[key]
        values = array.numpy()
        if (str(values.dtype) != spec.dtype and tuple(values.shape) == spec.shape
                and np.issubdtype(values.dtype, np.floating)
                and np.issubdtype(np.dtype(spec.dtype), np.floating)):
            with np.errstate(over="ignore"):
                values = values.astype(spec.dtype)
        out[key] = values
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in out.items()})


def first_non_finite(state: Any, path: str = "state") -> str | None:
    """The path of the first non-finite number in a strategy's state, else None.

    Walks dicts, lists, tuples, ArrayRecords, NumPy arrays and Python floats (a
    strategy's ``state_dict()``, or the attributes of one that has none).
    """
    if isinstance(state, np.ndarray):
        if np.issubdtype(state.dtype, np.number) and not np.all(np.isfinite(state)):
            return path
        return None
    if isinstance(state, float):
        return None if math.isfinite(state) else path
    if isinstance(state, ArrayRecord):
        state = {k: a.numpy() for k, a in state.items()}
    if isinstance(state, dict):
        for key, value in state.items():
            found = first_non_finite(value, f"{path}.{key}")
            if found:
                return found
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            found = first_non_finite(value, f"{path}[{i}]")
            if found:
                return found
    return None


def strategy_state(strategy: object) -> dict:
    """What a strategy carries from round to round: its ``state_dict()`` if it has one
    (our strategies and wrappers), else its attributes (Flower's built-ins)."""
    state_fn = getattr(strategy, "state_dict", None)
    return state_fn() if callable(state_fn) else dict(vars(strategy))
