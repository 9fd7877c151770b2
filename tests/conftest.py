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


@pytest.fixture(scope="session")
def test_base(tmp_path_factory):
    """A FedLoRA base for the digits CNN: its initial weights at another seed (what a base
    holds matters to the tests of fedlora, which make their own; a valid file is enough
    for the generic tests that build every strategy)."""
    from fl_app.model import build_model
    from partitions import dataset_info
    from strategies.fedlora import save_base

    path = tmp_path_factory.mktemp("lora-base") / "digits-cnn.npz"
    save_base(path, build_model(dataset_info("digits"), seed=99, kind="cnn").state_dict(),
              {"source": "tests/conftest.py: initial weights"})
    return path


@pytest.fixture
def make_config(defaults, test_base):
    """A run config from the defaults and overrides; FedLoRA gets the test base unless
    the overrides name one."""
    def _make(**overrides) -> RunConfig:
        if overrides.get("strategy") == "fedlora" and "lora-base" not in overrides:
            overrides["lora-base"] = str(test_base)
        return RunConfig.from_mapping({**defaults, **overrides})
    return _make


@pytest.fixture(autouse=True, scope="session")
def _serverapp_identity():
    """Messages can only be built inside a Flower process; pose as a ServerApp's task."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield


@pytest.fixture(autouse=True)
def _in_process_clients_pose_as_simulated(request, monkeypatch):
    """A ClientApp handler called in this process runs as the simulation engine runs it
    (it honours the server's client-state folder, keeps one accountant per run), unless
    the test is marked ``deployed_node``: then it behaves as on a deployed SuperNode.
    Real SuperNode processes (tests/test_deployment.py) are not affected."""
    from fl_app import privacy_policy

    simulated = request.node.get_closest_marker("deployed_node") is None
    monkeypatch.setattr(privacy_policy, "in_simulation", lambda: simulated)



def pytest_collection_modifyitems(config, items):
    """The modules with end-to-end tests first (a stable sort: each module stays whole and
    in order). The README runs the suite on 2 workers (``-n 2``, and pyproject's
    ``--dist loadscope``: a module's tests on one worker, so a module fixture such as a
    SuperLink with its sweep is built once); the slow modules then start first and the
    quick ones fill in around them, instead of one slow module starting last."""
    def module(item) -> str:
        return getattr(getattr(item, "module", None), "__name__", "")

    slow = {module(item) for item in items if item.get_closest_marker("e2e") is not None}
    items.sort(key=lambda item: module(item) not in slow)
