"""Shared fixtures: offline datasets, the default run config, a ServerApp task identity."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

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


@pytest.fixture(autouse=True, scope="session")
def _serverapp_identity():
    """Messages can only be built inside a Flower process; pose as a ServerApp's task."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
