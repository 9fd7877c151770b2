"""Edge cases over every registered strategy (behind Guarded, as the ServerApp runs them):
one client, a failed reply, each kind of bad reply, and too few valid replies.

The Byzantine-robust rules (krum, multikrum, bulyan) need at least 3 replies even with
f = 0, so they get 3 good replies where the others get one, and no one-client case."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

import strategies
from strategies.guard import Guarded
from tests.helpers import make_grid, make_reply

GLOBAL = {"conv.weight": np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6),
          "conv.bias": np.array([0.1, -0.2], dtype=np.float32)}


def good_count(name: str) -> int:
    min_replies = strategies.spec(name).traits.min_replies
    return min_replies(0) if min_replies is not None else 1


def good_replies(strategy: Guarded, name: str) -> list:
    return [make_reply(valid_arrays(strategy, 0.05 * (1 + i)), node_id=10 + i)
            for i in range(good_count(name))]


def setup(name, make_config, min_valid=1) -> Guarded:
    cfg = make_config(strategy=name, **{"min-train-nodes": max(min_valid, good_count(name))})
    strategy = strategies.guarded(name, strategies.build(cfg, 3, total_examples=1000),
                                  min_valid_replies=min_valid)
    arrays = ArrayRecord({k: Array(v.copy()) for k, v in GLOBAL.items()})
    strategy.configure_train(1, arrays, ConfigRecord(), make_grid([1, 2, 3]))
    return strategy


def valid_arrays(strategy: Guarded, shift: float) -> dict[str, np.ndarray]:
    """A plausible reply in the layout this strategy expects (model, plus Delta c for SCAFFOLD)."""
    out = {}
    for key, spec in strategy._expected_spec.items():
        base = GLOBAL.get(key, np.zeros(spec.shape, dtype=spec.dtype))
        out[key] = (base + shift).astype(spec.dtype)
    return out


def corrupt(arrays: dict, how: str) -> dict:
    arrays = {k: v.copy() for k, v in arrays.items()}
    first = next(iter(arrays))
    if how == "missing-key":
        arrays.pop(list(arrays)[-1])
    elif how == "extra-key":
        arrays["intruder"] = np.zeros(1, np.float32)
    elif how == "shape":
        arrays[first] = np.zeros((3, 3), np.float32)
    elif how == "nan":
        arrays[first].flat[0] = np.nan
    elif how == "inf":
        arrays[first].flat[-1] = -np.inf
    return arrays


def assert_finite_global_layout(result):
    assert result is not None
    assert list(result.keys()) == list(GLOBAL)
    for key, array in result.items():
        assert array.numpy().shape == GLOBAL[key].shape
        assert np.all(np.isfinite(array.numpy())), key


@pytest.mark.parametrize("name", [n for n in strategies.NAMES if strategies.spec(n).traits.min_replies is None])
def test_one_client(name, make_config):
    strategy = setup(name, make_config)
    result, metrics = strategy.aggregate_train(1, [make_reply(valid_arrays(strategy, 0.05), node_id=1)])
    assert_finite_global_layout(result)
    assert metrics["replies-valid"] == 1
    moved = sum(float(np.abs(result[k].numpy() - GLOBAL[k]).sum()) for k in GLOBAL)
    assert moved > 0  # the single client's update was applied


@pytest.mark.parametrize("name", strategies.NAMES)
def test_failed_reply_is_left_out(name, make_config):
    strategy = setup(name, make_config)
    replies = good_replies(strategy, name) + [make_reply(None, error="ClientApp crashed", node_id=2)]
    result, metrics = strategy.aggregate_train(1, replies)
    assert_finite_global_layout(result)
    assert (metrics["replies-valid"], metrics["replies-rejected"]) == (good_count(name), 1)


BAD = ["missing-key", "extra-key", "shape", "nan", "inf", "zero-examples", "negative-examples"]


@pytest.mark.parametrize("how", BAD)
@pytest.mark.parametrize("name", strategies.NAMES)
def test_bad_reply_is_left_out_and_model_stays_finite(name, how, make_config):
    strategy = setup(name, make_config)
    num_examples = {"zero-examples": 0, "negative-examples": -3}.get(how, 10)
    bad = make_reply(corrupt(valid_arrays(strategy, 1e6), how), num_examples=num_examples, node_id=2)
    result, metrics = strategy.aggregate_train(1, good_replies(strategy, name) + [bad])
    assert_finite_global_layout(result)
    assert (metrics["replies-valid"], metrics["replies-rejected"]) == (good_count(name), 1)
    # the huge values of the bad reply never reached the model
    assert max(float(np.abs(result[k].numpy()).max()) for k in GLOBAL) < 10
    # alone, the bad reply leaves the model unchanged
    alone, metrics = setup(name, make_config).aggregate_train(1, [bad])
    assert alone is None and metrics["replies-rejected"] == 1


@pytest.mark.parametrize("name", strategies.NAMES)
def test_fewer_valid_replies_than_minimum_leaves_model_unchanged(name, make_config):
    strategy = setup(name, make_config, min_valid=2)
    replies = [make_reply(valid_arrays(strategy, 0.05), node_id=1),
               make_reply(corrupt(valid_arrays(strategy, 0.05), "nan"), node_id=2)]
    result, metrics = strategy.aggregate_train(1, replies)
    assert result is None and metrics["replies-valid"] == 1


@pytest.mark.parametrize("name", strategies.NAMES)
def test_summary_logs_without_error(name, make_config):
    """Flower calls summary() when a run starts; a crash there ends the run."""
    setup(name, make_config).summary()
