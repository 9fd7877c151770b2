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

An Array's ``dtype`` and ``shape`` fields travel beside its data (the .npy bytes) and
Flower's ``Array.numpy()`` does not compare them, so the values are read with
``array_values``, which does: a reply whose data hold another shape (a (1,) array would
broadcast into every weight of the mean) is rejected. It is also the fast path the
server needs at scale: ``np.load`` parses each array's header with ``ast.literal_eval``
(~80 us an array, ~2 s a round for 1,000 SCAFFOLD replies); comparing the header bytes
with the one numpy writes for the announced dtype and shape costs ~2 us.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fl_common.wire import NUM_EXAMPLES


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


@lru_cache(maxsize=512)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The .npy header (format 1.0) numpy writes for a C-ordered array (``np.save``)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
        "shape": shape})
    return buffer.getvalue()


def array_values(array: Array) -> np.ndarray:
    """The values of a Flower ``Array`` (read-only), checked against its own ``dtype`` and
    ``shape`` fields; ValueError if they disagree. The usual case (the header numpy writes
    for that dtype and shape, then exactly that many bytes) is a zero-copy view; anything
    else goes through ``Array.numpy()`` and is compared."""
    shape = tuple(int(d) for d in array.shape)
    data = array.data
    try:
        dtype = np.dtype(str(array.dtype))
        header = _npy_header(str(array.dtype), shape)
    except (TypeError, ValueError):
        dtype, header = None, b""
    count = math.prod(shape)
    if (dtype is not None and not dtype.hasobject and header
            and len(data) == len(header) + count * dtype.itemsize
            and data[:len(header)] == header):
        return np.frombuffer(data, dtype=dtype, count=count, offset=len(header)).reshape(shape)
    values = array.numpy()
    if values.shape != shape or str(values.dtype) != str(array.dtype):
        raise ValueError(f"its data hold {values.dtype} {values.shape}, its fields say "
                         f"{array.dtype} {shape}")
    return values


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
        try:
            values = array_values(array)
        except ValueError as err:
            return f"array '{key}' is inconsistent: {err}"
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
