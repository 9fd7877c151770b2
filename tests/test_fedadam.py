"""FedAdam: one round by hand, Flower's FedAdam reproduced up to its (documented) bias
correction over several rounds, state save/restore, and hyperparameter checks."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdam as FlowerFedAdam

from strategies.fedadam import FedAdam, bias_correction_factor, fedadam_step
from tests.helpers import make_grid, make_reply

KW = dict(min_train_nodes=1, min_available_nodes=1)


def record(values) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(values, dtype=np.float32))})


def test_one_round_by_hand():
    """Expected values from:

        x = np.array([1.0, 2.0]); mean = (1 * np.array([1, 1]) + 3 * np.array([1.75, 1])) / 4
        delta = mean - x                       # (.5625, -1)
        m = 0.1 * delta                        # (1 - beta_1) * delta
        v = 0.01 * delta ** 2                  # (1 - beta_2) * delta^2
        x + 0.1 * m / (np.sqrt(v) + 1e-3)      # (1.0982532751, 1.9009900990)
    """
    strategy = FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3, **KW)
    strategy.configure_train(1, record([1.0, 2.0]), ConfigRecord(), make_grid([1, 2]))
    replies = [make_reply({"w": np.array([1.0, 1.0], np.float32)}, num_examples=1, node_id=1),
               make_reply({"w": np.array([1.75, 1.0], np.float32)}, num_examples=3, node_id=2)]
    new, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(new["w"].numpy(), [1.0982532751, 1.9009900990], rtol=1e-6)
    np.testing.assert_allclose(strategy.m["w"], [0.05625, -0.1], rtol=1e-6)
    np.testing.assert_allclose(strategy.v["w"], [0.0031640625, 0.01], rtol=1e-5)


def test_pure_step_second_round_uses_the_moments():
    """m1 = (.1), v1 = (.01) from Delta1 = 1; Delta2 = -1, beta_1 = .5, beta_2 = .5, tau = 0 would
    divide by sqrt(v); with tau = .1: m2 = -.45, v2 = .505, x = 0 + 1 * -.45/(.7106 + .1)."""
    x, m, v = fedadam_step({"w": np.zeros(1)}, {"w": np.array([-1.0])}, {"w": np.array([0.1])},
                           {"w": np.array([0.01])}, eta=1.0, beta_1=0.5, beta_2=0.5, tau=0.1)
    assert m["w"][0] == pytest.approx(-0.45) and v["w"][0] == pytest.approx(0.505)
    assert x["w"][0] == pytest.approx(-0.45 / (np.sqrt(0.505) + 0.1))


def test_matches_flower_fedadam_up_to_its_bias_correction_over_rounds():
    rng = np.random.default_rng(0)
    params = dict(eta=0.03, beta_1=0.9, beta_2=0.99, tau=1e-3)
    ours = FedAdam(**params, **KW)
    flower = FlowerFedAdam(eta=params["eta"], beta_1=0.9, beta_2=0.99, tau=1e-3, **KW)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    grid = make_grid([1, 2, 3])
    for rnd in range(1, 6):
        for strategy in (ours, flower):
            strategy.configure_train(rnd, ArrayRecord({"w": Array(x.copy())}), ConfigRecord(), grid)
        replies = [make_reply({"w": (x + rng.normal(scale=0.1, size=x.shape)).astype(np.float32)},
                              num_examples=int(rng.integers(1, 50)), node_id=i) for i in (1, 2, 3)]
        got, _ = ours.aggregate_train(rnd, replies)
        ref, _ = flower.aggregate_train(rnd, replies)
        # identical moments ...
        np.testing.assert_allclose(ours.m["w"], flower.m_t["w"], rtol=1e-6)
        np.testing.assert_allclose(ours.v["w"], flower.v_t["w"], rtol=1e-6)
        # ... and Flower's step is ours times its bias-correction factor
        factor = bias_correction_factor(rnd, 0.9, 0.99)
        assert factor != pytest.approx(1.0, abs=1e-3)
        np.testing.assert_allclose(ref["w"].numpy() - x, factor * (got["w"].numpy() - x),
                                   rtol=1e-4, atol=1e-6)
        x = ref["w"].numpy()  # both continue from the same x


def test_restored_state_continues_identically():
    rng = np.random.default_rng(2)
    replies = [make_reply({"w": rng.normal(size=3).astype(np.float32)}, node_id=i) for i in (1, 2)]
    a = FedAdam(**KW)
    x = record(np.zeros(3))
    a.configure_train(1, x, ConfigRecord(), make_grid([1, 2]))
    x2, _ = a.aggregate_train(1, replies)
    b = FedAdam(**KW)
    b.load_state_dict(a.state_dict())
    for s in (a, b):
        s.configure_train(2, x2, ConfigRecord(), make_grid([1, 2]))
    np.testing.assert_array_equal(a.aggregate_train(2, replies)[0]["w"].numpy(),
                                  b.aggregate_train(2, replies)[0]["w"].numpy())


@pytest.mark.parametrize("kwargs, message", [
    (dict(eta=0.0), "server-lr"), (dict(eta=-1.0), "server-lr"),
    (dict(beta_1=1.0), "beta-1"), (dict(beta_1=-0.1), "beta-1"), (dict(beta_2=1.5), "beta-2"),
    (dict(tau=0.0), "tau"),
])
def test_bad_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FedAdam(**kwargs)
