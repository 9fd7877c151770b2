"""Test helpers: a reply factory and a grid stand-in, shared by the strategy tests."""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict


def make_reply(
    arrays: dict[str, np.ndarray] | None,
    num_examples: float | None = 10,
    node_id: int = 1,
    error: str | None = None,
    extra_metrics: dict | None = None,
    array_key: str = "arrays",
) -> Mock:
    """A reply as a strategy sees it: a Mock(spec=Message) around a real RecordDict."""
    content = RecordDict()
    if arrays is not None:
        content[array_key] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    metrics = dict(extra_metrics or {})
    if num_examples is not None:
        metrics["num-examples"] = num_examples
    content["metrics"] = MetricRecord(metrics)
    msg = Mock(spec=Message)
    msg.content = content
    msg.has_error.return_value = error is not None
    msg.error = Mock(reason=error)
    msg.metadata = Mock(src_node_id=node_id)
    return msg


def make_grid(node_ids: list[int]) -> Mock:
    grid = Mock()
    grid.get_node_ids.return_value = list(node_ids)
    return grid
