"""Shared fixtures: offline datasets, the default run config, and one reply factory."""

from __future__ import annotations

import os
from unittest.mock import Mock

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict  # noqa: E402

from fl_app.config import RunConfig, default_run_config  # noqa: E402


@pytest.fixture
def defaults() -> dict:
    """The app's default run config (pyproject.toml), as Flower would pass it."""
    return default_run_config()


@pytest.fixture
def make_config(defaults):
    def _make(**overrides) -> RunConfig:
        return RunConfig.from_mapping({**defaults, **overrides})
    return _make


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


@pytest.fixture
def reply():
    return make_reply


@pytest.fixture(autouse=True, scope="session")
def _serverapp_identity():
    """Messages can only be built inside a Flower process; pose as a ServerApp's task."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield


def make_grid(node_ids: list[int]) -> Mock:
    grid = Mock()
    grid.get_node_ids.return_value = list(node_ids)
    return grid
