"""Simulated attacks (a test facility): each changes the reply the way its definition
says, only attackers attack, the omniscient ones see the benign updates, and bad
settings fail before training."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
from flwr.superlink.grid import inmemory_grid as flwr_inmemory
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from fl_app.attacks import (
    ClientAttack,
    attacker_partitions,
    client_attack,
    flip_labels,
    gaussian,
    sign_flip,
)
from fl_app.server_app import check_test_facilities
from partitions import ImageArrays
from strategies.attack_sim import AttackSimulation, alie_update, alie_z, ipm_update
from strategies.guard import Guarded
from strategies.krum import Krum
from tests.helpers import make_grid, make_reply


def test_sign_flip_negates_and_scales_the_update():
    """x = (1, 1), y = (3, 0), s = 2: update (2, -1) -> -(4, -2): y' = (-3, 3)."""
    x, y = {"w": np.array([1.0, 1.0], np.float32)}, {"w": np.array([3.0, 0.0], np.float32)}
    out = sign_flip(x, y, 2.0)
    np.testing.assert_allclose(out["w"], [-3.0, 3.0])
    assert out["w"].dtype == np.float32


def test_gaussian_replaces_the_update_with_seeded_noise():
    x, y = {"w": np.full(20_000, 5.0, np.float32)}, {"w": np.full(20_000, 9.0, np.float32)}
    a = gaussian(x, y, 0.5, np.random.default_rng(1))["w"]
    b = gaussian(x, y, 0.5, np.random.default_rng(1))["w"]
    np.testing.assert_array_equal(a, b)
    assert abs(float(a.mean()) - 5.0) < 0.02 and abs(float(a.std()) - 0.5) < 0.02  # y is gone


def test_label_flip_relabels_only_and_only_attackers():
    data = ImageArrays(np.zeros((4, 1, 2, 2), np.float32), np.array([0, 3, 9, 5]))
    flipped = flip_labels(data, 10)
    np.testing.assert_array_equal(flipped.y, [9, 6, 0, 4])
    assert flipped.x is data.x


def test_attackers_follow_the_seed_and_only_they_attack(make_config):
    cfg = make_config(attack="label-flip", **{"num-attackers": 3, "seed": 4})
    chosen = attacker_partitions(4, 10, 3)
    assert chosen == attacker_partitions(4, 10, 3) and len(chosen) == 3
    assert chosen != attacker_partitions(5, 10, 3)
    for pid in range(10):
        attack = client_attack(cfg, pid, 10, server_round=2)
        assert (attack is not None) == (pid in chosen)
    assert client_attack(make_config(attack="alie", **{"num-attackers": 3}), min(chosen), 10, 2) is None
    with pytest.raises(ValueError, match="'num-attackers' = 11 must be in"):
        attacker_partitions(0, 10, 11)


def test_client_attack_dispatch():
    x, y = {"w": np.zeros(2, np.float32)}, {"w": np.ones(2, np.float32)}
    np.testing.assert_allclose(ClientAttack("sign-flip", 3.0, 1.0, 0).update(x, y)["w"], [-3, -3])
    np.testing.assert_array_equal(ClientAttack("label-flip", 1.0, 1.0, 0).update(x, y)["w"], y["w"])


def test_alie_z_follows_the_paper():
    """n = 10, f = 2: s = floor(10/2 + 1) - 2 = 4, z = Phi^-1(6/10) = 0.2533."""
    assert alie_z(10, 2) == pytest.approx(NormalDist().inv_cdf(0.6))
    assert alie_z(10, 2) == pytest.approx(0.253347, abs=1e-6)


def test_alie_and_ipm_updates_by_hand():
    """Benign updates (0, 2) and (2, 6): mean (1, 4), population std (1, 2);
    ALIE with z = 0.5: (0.5, 3); IPM with epsilon 0.1: (-0.1, -0.4)."""
    benign = [{"w": np.array([0.0, 2.0])}, {"w": np.array([2.0, 6.0])}]
    np.testing.assert_allclose(alie_update(benign, 0.5)["w"], [0.5, 3.0])
    np.testing.assert_allclose(ipm_update(benign, 0.1)["w"], [-0.1, -0.4])


def run_round(inner, attack, replies_w, attackers, x, epsilon=0.1):
    partition = {node: node - 1 for node in range(1, len(replies_w) + 1)}
    sim = AttackSimulation(inner, attack=attack, attackers=frozenset(attackers),
                           partition_of=partition.get, epsilon=epsilon,
                           selected=(lambda: inner.last_selected)
                           if hasattr(inner, "last_selected") else None)
    guard = Guarded(sim)
    guard.configure_train(1, ArrayRecord({"w": Array(x)}), ConfigRecord(),
                          make_grid(list(partition)))
    replies = [make_reply({"w": w}, node_id=i + 1) for i, w in enumerate(replies_w)]
    return guard.aggregate_train(1, replies), replies


def test_ipm_rewrites_the_attackers_replies_before_the_strategy():
    """x = 0, benign replies 1 and 3 (updates 1, 3), attackers 0 and 1: each attacker sends
    -0.5 * mean(1, 3) = -1; FedAvg of (-1, -1, 1, 3) = 0.5."""
    from flwr.serverapp.strategy import FedAvg

    x = np.zeros(1, np.float32)
    ws = [np.array([v], np.float32) for v in (100.0, -50.0, 1.0, 3.0)]
    (arrays, metrics), replies = run_round(FedAvg(min_train_nodes=1, min_available_nodes=1), "ipm",
                                           ws, {0, 1}, x, epsilon=0.5)
    np.testing.assert_allclose(arrays["w"].numpy(), [0.5])
    np.testing.assert_allclose(replies[0].content["arrays"]["w"].numpy(), [-1.0])
    assert metrics["attackers-sampled"] == 2


def test_selected_attackers_are_counted_for_krum():
    """Three benign replies near 0 and two outliers from the attacking partitions 0 and 3:
    Krum (f = 1) selects a benign one: 2 attackers sampled, 0 selected."""
    x = np.zeros(2, np.float32)
    ws = [np.array(v, np.float32) for v in ([50, 50], [0.1, 0], [0, 0.1], [-60, 40], [0.05, 0.05])]
    (arrays, metrics), _ = run_round(Krum(num_malicious=1, min_train_nodes=1, min_available_nodes=1),
                                     "sign-flip", ws, {0, 3}, x)
    assert metrics["attackers-sampled"] == 2 and metrics["attackers-selected"] == 0
    assert np.abs(arrays["w"].numpy()).max() < 1


@pytest.mark.parametrize("overrides, message", [
    ({"attack": "backdoor"}, "'attack' must be one of"),
    ({"attack": "sign-flip"}, "'num-attackers' must be >= 1 when 'attack' = 'sign-flip'"),
    ({"num-attackers": -1}, "'num-attackers' must be an integer >= 0"),
    ({"attack-scale": 0.0}, "'attack-scale' must be a number > 0"),
    ({"attack-std": -1.0}, "'attack-std' must be a number > 0"),
    ({"attack-epsilon": float("inf")}, "'attack-epsilon' must be a number > 0"),
])
def test_bad_attack_settings_are_refused(make_config, overrides, message):
    with pytest.raises(ValueError) as err:
        make_config(**overrides)
    assert message in str(err.value)


class InMemoryGrid(flwr_inmemory.InMemoryGrid):  # Flower's simulation grid, without a state
    def __init__(self) -> None:
        pass


class HttpGrid:  # stands for the deployment runtime's grid
    pass


def test_attacks_are_refused_outside_simulation_and_beyond_the_partitions(make_config):
    cfg = make_config(attack="sign-flip", **{"num-attackers": 2})
    check_test_facilities(cfg, InMemoryGrid(), 10)
    with pytest.raises(ValueError, match="simulation-only test facility"):
        check_test_facilities(cfg, HttpGrid(), 10)
    with pytest.raises(ValueError, match="'num-attackers' = 2 exceeds the 1 partitions"):
        check_test_facilities(cfg, InMemoryGrid(), 1)
    check_test_facilities(make_config(), HttpGrid(), 10)  # no attack: fine anywhere


def test_attack_wrapper_summary_names_the_attack_its_partitions_and_the_defence(caplog):
    """Flower calls summary() when a run starts: the log must say which attack runs, by
    which partitions (the seed's draw, sorted), and then the wrapped defence's settings."""
    attackers = attacker_partitions(3, 10, 2)
    guard = Guarded(AttackSimulation(Krum(num_malicious=2), attack="ipm", attackers=attackers,
                                     partition_of={}.get, epsilon=0.1), min_valid_replies=7)
    with caplog.at_level("INFO", logger="flwr"):
        guard.summary()
    lines = [r.getMessage() for r in caplog.records if r.name == "flwr"]
    attack = f"SIMULATED ATTACK (test facility): ipm by partitions {sorted(attackers)}"
    assert len(attackers) == 2
    order = [next(i for i, line in enumerate(lines) if text in line) for text in
             ("Guarded:", attack, "Krum: f = 2, m = 1 (n >= 7 replies per round)")]
    assert order == sorted(order), lines  # outermost first, as the layers wrap
    assert "at least 7 valid replies per round" in lines[order[0]]


# ---------------------------------------------------------------- client attack x SCAFFOLD
def scaffold_train_message(cfg, x: dict, c: dict, server_round: int = 1):
    """A SCAFFOLD train message as the server sends it: the model, c, this client's
    (empty) entry of the accepted map, and the config."""
    from flwr.app import Message, RecordDict

    from fl_common import wire
    from strategies.scaffold import ACCEPTED_RECORD, C_RECORD, CONTROL_VARIATE

    content = RecordDict({
        wire.ARRAYS: ArrayRecord({k: Array(v.copy()) for k, v in x.items()}),
        C_RECORD: ArrayRecord({k: Array(v.copy()) for k, v in c.items()}),
        ACCEPTED_RECORD: ConfigRecord({}),
        wire.CONFIG: ConfigRecord({wire.RUN_CONFIG: cfg.to_json(), wire.RUN_TAG: "attack-scaffold",
                                   wire.SERVER_ROUND: server_round,
                                   CONTROL_VARIATE: cfg.scaffold_control_variate}),
    })
    return Message(content, dst_node_id=7, message_type="train")


def test_a_sign_flipping_scaffold_client_flips_its_model_and_still_sends_delta_c(make_config):
    """The attacking partition's reply (strategy scaffold, sign-flip with scale 3): its
    model arrays are x - 3 (y - x), with y what the same client sends without the attack
    (same seed, same message), while its Delta c_i arrays are all there, finite, and
    those of the honest client: the attack rewrites the update, not the control variate."""
    from flwr.app import Context, RecordDict

    from fl_app import client_app
    from fl_app.model import build_model
    from fl_common import wire
    from partitions import dataset_info
    from strategies.scaffold import DC_PREFIX, STATE_PENDING

    num_partitions = 4
    attacked = make_config(strategy="scaffold", attack="sign-flip",
                           **{"num-attackers": 1, "attack-scale": 3.0})
    honest = make_config(strategy="scaffold")
    (pid,) = attacker_partitions(attacked.seed, num_partitions, 1)
    assert client_attack(attacked, pid, num_partitions, 1) is not None
    model = build_model(dataset_info(attacked.dataset), seed=0)
    x = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    c = {k: rng.normal(0, 0.01, v.shape).astype(v.dtype) for k, v in x.items()}

    def reply(cfg):
        context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                          node_config={wire.PARTITION_ID: pid, wire.NUM_PARTITIONS: num_partitions})
        out = client_app.train(scaffold_train_message(cfg, x, c), context)
        assert not out.has_error(), out.error.reason if out.has_error() else ""
        return out.content[wire.ARRAYS], context.state

    bad, bad_state = reply(attacked)
    good, good_state = reply(honest)
    dc_keys = {DC_PREFIX + k for k in x}
    assert set(bad.keys()) == set(good.keys()) == set(x) | dc_keys
    y = {k: good[k].numpy() for k in x}
    assert max(float(np.abs(y[k] - x[k]).max()) for k in x) > 1e-3  # the client trained
    flipped = sign_flip(x, y, 3.0)
    for key in x:
        got = bad[key].numpy()
        assert got.dtype == x[key].dtype
        np.testing.assert_allclose(got, flipped[key], rtol=0, atol=1e-6, err_msg=key)
        # by hand: x - 3 (y - x), in float64
        np.testing.assert_allclose(got, x[key] - 3.0 * (y[key].astype(np.float64) - x[key]),
                                   rtol=0, atol=1e-6, err_msg=key)
    for key in dc_keys:
        dc = bad[key].numpy()
        assert dc.shape == x[key[len(DC_PREFIX):]].shape and np.all(np.isfinite(dc)), key
        np.testing.assert_array_equal(dc, good[key].numpy(), err_msg=key)
    assert any(np.abs(bad[k].numpy()).max() > 0 for k in dc_keys)
    # and the client keeps the same pending c_i+ as the honest one (c_i+ = c_i + Delta c_i)
    for key in x:
        np.testing.assert_array_equal(bad_state[STATE_PENDING][key].numpy(),
                                      good_state[STATE_PENDING][key].numpy())
