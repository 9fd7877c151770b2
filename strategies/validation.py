"""Reply validation shared by every strategy: a bad reply is left out, never averaged in.

A train reply is accepted only if it holds exactly one ArrayRecord whose keys, order,
shapes and dtypes equal what the server expects back (by default: what it sent), every
array value is finite, and exactly one MetricRecord whose ``num-examples`` is a finite
number > 0 and whose other values are finite. Each rejection carries its reason.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

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


def check_metrics(record: MetricRecord, weighted_by_key: str = NUM_EXAMPLES) -> str | None:
    """None if the MetricRecord has a positive, finite weight and finite values."""
    if weighted_by_key not in record:
        return f"metric '{weighted_by_key}' is missing"
    weight = record[weighted_by_key]
    if not _finite_number(weight) or weight <= 0:
        return f"metric '{weighted_by_key}' must be a finite number > 0, got {weight!r}"
    for key, value in record.items():
        values = value if isinstance(value, list) else [value]
        if not all(_finite_number(v) for v in values):
            return f"metric '{key}' is not finite"
    return None


def check_reply(
    content: RecordDict,
    expected_arrays: dict[str, ArraySpec] | None,
    weighted_by_key: str = NUM_EXAMPLES,
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
    return check_metrics(next(iter(content.metric_records.values())), weighted_by_key)


def split_replies(
    replies: Iterable[Message],
    expected_arrays: dict[str, ArraySpec] | None,
    weighted_by_key: str = NUM_EXAMPLES,
) -> tuple[list[Message], list[tuple[Message, str]]]:
    """(valid replies, [(rejected reply, reason)]).

    Replies must also agree on their metric keys (Flower's aggregation needs it); the
    most common key set wins, and a reply with another set is rejected.
    """
    valid: list[Message] = []
    rejected: list[tuple[Message, str]] = []
    for msg in replies:
        if msg.has_error():
            rejected.append((msg, f"client error: {msg.error.reason}"))
            continue
        problem = check_reply(msg.content, expected_arrays, weighted_by_key)
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
