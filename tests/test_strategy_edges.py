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


def setup(name, make_config, min_valid=1, **overrides) -> Guarded:
    cfg = make_config(strategy=name, **{"min-train-nodes": max(min_valid, good_count(name)),
                                        **overrides})
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


# Settings that tell the server step apart from "the client's model" (server-lr 1 would
# make FedAvgM's and SCAFFOLD's first step exactly y).
ONE_CLIENT_OVERRIDES = {"fedavgm": {"server-lr": 0.5}, "scaffold": {"server-lr": 0.5}}


def one_client_expected(name: str, cfg, x: dict, y: dict) -> dict[str, np.ndarray]:
    """The aggregate of round 1 with the single reply y from the global model x, by hand
    from each algorithm's update rule (in float64), with delta = y - x:

    - fedavg, fedprox, fedmedian, fedtrimmedavg, fedper (FedAvg on the base arrays, all
      of them here), fedlora (FedAvg on the adapter arrays): the weighted mean / median / trimmed mean (int(0.2 * 1) = 0 cut) of
      one reply is the reply: y;
    - fedavgm: the momentum buffer starts as the pseudo-gradient x - y (Flower's, as
      torch.optim.SGD), so x - eta * (x - y) = x + eta * delta;
    - scaffold: x + eta_g * p * delta with p = 1 for one reply;
    - fedadam (ours, no bias correction) and fedyogi: m = (1 - b1) delta and
      v = (1 - b2) delta^2 (Yogi: v0 - (1 - b2) delta^2 sign(v0 - delta^2) with v0 = 0),
      x + eta * m / (sqrt(v) + tau);
    - fedadagrad: b1 = 0 (Flower fixes it), m = delta, v = delta^2: x + eta * delta / (|delta| + tau).
    """
    lr = cfg.effective_server_lr
    b1, b2, tau = float(cfg.beta_1), float(cfg.beta_2), float(cfg.tau)
    out = {}
    for k in x:
        xk, yk = x[k].astype(np.float64), y[k].astype(np.float64)
        d = yk - xk
        if name in ("fedavg", "fedprox", "fedmedian", "fedtrimmedavg", "fedper", "fedlora"):
            out[k] = yk
        elif name in ("fedavgm", "scaffold"):
            out[k] = xk + lr * d
        elif name in ("fedadam", "fedyogi"):
            out[k] = xk + lr * (1 - b1) * d / (np.sqrt((1 - b2) * d * d) + tau)
        elif name == "fedadagrad":
            out[k] = xk + lr * d / (np.abs(d) + tau)
        else:
            raise AssertionError(f"no hand-computed one-client step for {name!r}")
    return out


@pytest.mark.parametrize("name", [n for n in strategies.NAMES if strategies.spec(n).traits.min_replies is None])
def test_one_client(name, make_config):
    overrides = ONE_CLIENT_OVERRIDES.get(name, {})
    cfg = make_config(strategy=name, **{"min-train-nodes": 1, **overrides})
    strategy = setup(name, make_config, **overrides)
    reply = valid_arrays(strategy, 0.05)
    result, metrics = strategy.aggregate_train(1, [make_reply(reply, node_id=1)])
    assert_finite_global_layout(result)
    assert metrics["replies-valid"] == 1
    expected = one_client_expected(name, cfg, GLOBAL, reply)
    for key in GLOBAL:
        got = result[key].numpy()
        assert got.dtype == GLOBAL[key].dtype
        np.testing.assert_allclose(got, expected[key], rtol=1e-6, atol=1e-7, err_msg=key)
        # and the step moved the model (delta = 0.05 per weight, so the check has teeth)
        assert not np.allclose(got, GLOBAL[key], atol=1e-4), key
    if name == "scaffold":  # c = 0 + q * Delta c, q = n_i / n = 10 / 1000
        inner = strategy.inner
        for key in GLOBAL:
            np.testing.assert_allclose(inner.c[key], 10 / 1000 * reply["scaffold-dc/" + key],
                                       rtol=1e-6)


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


# Non-default settings, so that a summary that logs a default, or another key, fails.
SUMMARY_SETTINGS = {
    "proximal-mu": 0.037, "server-lr": 0.3, "server-momentum": 0.7, "beta-1": 0.8,
    "beta-2": 0.95, "tau": 0.002, "trim-fraction": 0.15, "fraction-train": 0.5,
    "personal-layers": 2, "lora-rank": 2, "lora-alpha": 3.0,
}
# What each strategy's summary must say (besides Guarded's line and FedAvg's sampling).
SUMMARY_LINES = {
    "fedavg": [],
    "fedprox": ["FedProx: proximal-mu (mu) = 0.037"],
    "scaffold": ["SCAFFOLD (Option II, gradient-mean, num-examples weighting): eta_g = 0.3, N = 3"],
    "fedadam": ["FedAdam: eta 0.3, beta_1 0.8, beta_2 0.95, tau 0.002 (no bias correction)"],
    "fedavgm": ["Server optimization: ON", "Server learning rate: 0.3", "Server Momentum: 0.7"],
    "fedyogi": ["eta (0.3) | eta_l (0.05)", "beta_1 (0.8) | beta_2 (0.95)", "tau (0.002)"],
    "fedadagrad": ["eta (0.3) | eta_l (0.05)", "beta_1 (0) | beta_2 (0)", "tau (0.002)"],
    "fedmedian": [],
    "fedtrimmedavg": ["beta: 0.15"],
    "krum": ["Krum: f = 1, m = 1 (n >= 5 replies per round)"],
    "multikrum": ["Multi-Krum: f = 1, m = 3 (n >= 5 replies per round)"],
    "bulyan": ["Number of malicious nodes: 1", "Selection rule: select_multikrum"],
    "fedper": ["FedPer: personal layers 2 stay on the clients"],
    "fedlora": ["FedLoRA: rank-2 adapters (alpha 3) on a pretrained base"],
}
SUMMARY_ROBUST = {"krum": {"num-malicious": 1, "min-train-nodes": 5},
                  "multikrum": {"num-malicious": 1, "min-train-nodes": 5, "num-selected": 3},
                  "bulyan": {"num-malicious": 1, "min-train-nodes": 7}}


def test_every_strategy_has_summary_lines():
    assert set(SUMMARY_LINES) == set(strategies.NAMES)


@pytest.mark.parametrize("name", strategies.NAMES)
def test_summary_names_the_strategys_settings(name, make_config, caplog):
    """Flower calls summary() when a run starts; it must log this run's settings: the
    run config's values, not the defaults."""
    overrides = {**SUMMARY_SETTINGS, **SUMMARY_ROBUST.get(name, {"min-train-nodes": 4})}
    cfg = make_config(strategy=name, **overrides)
    strategy = strategies.guarded(name, strategies.build(cfg, 3, total_examples=1000),
                                  min_valid_replies=cfg.min_train_nodes)
    with caplog.at_level("INFO", logger="flwr"):
        strategy.summary()
    text = caplog.text
    lines = [f"Guarded: reply validation, seeded partition-space sampling, at least "
             f"{cfg.min_train_nodes} valid replies per round",
             "Fraction: train (0.50) | evaluate ( 1.00)",
             f"Minimum nodes: train ({cfg.min_train_nodes}) | evaluate (1)",
             *SUMMARY_LINES[name]]
    for line in lines:
        assert line in text, (line, text)
