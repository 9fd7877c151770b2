"""User-level (central) DP: the client clips its update (Flower's fixedclipping_mod behind
our gate), the server adds noise of std sigma C / m to the uniform mean of exactly m
updates (Flower's wrapper), and the spend is right (against Google's dp-accounting)."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fl_app.central_dp import central_dp_gate
from strategies.central_dp import EPSILON_METRIC, UserLevelDP, user_level_epsilon, user_noise
from strategies.guard import Guarded
from tests.helpers import make_grid, make_reply


@pytest.mark.parametrize("sigma, rounds", [(1.0, 10), (0.7, 50), (2.5, 200)])
def test_user_level_epsilon_matches_dp_accounting(sigma, rounds):
    """R releases of a Gaussian mechanism (no sampling amplification): Opacus's RDP
    epsilon equals dp-accounting's at the same orders to 0.5%."""
    from opacus.accountants import RDPAccountant

    theirs = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    theirs.compose(dp_accounting.GaussianDpEvent(sigma), rounds)
    assert user_level_epsilon(sigma, rounds, 1e-5) == pytest.approx(theirs.get_epsilon(1e-5), rel=5e-3)
    assert user_level_epsilon(sigma, 0, 1e-5) == 0.0


def dp_guard(m=4, sigma=2.0, clip=0.5, seed=0):
    wrapper = UserLevelDP(FedAvg(min_train_nodes=1, min_available_nodes=1), noise_multiplier=sigma,
                          clipping_norm=clip, num_sampled_clients=m, delta=1e-5, seed=seed)
    return Guarded(wrapper, min_valid_replies=m), wrapper


def test_server_adds_noise_of_std_sigma_clip_over_m_to_the_uniform_mean():
    """4 replies of 50,000 weights, all equal to 1 (weights 1): the aggregate is
    1 + N(0, (2 * 0.5 / 4)^2): sample std 0.25 within 1%, mean 1 within 0.01."""
    guard, wrapper = dp_guard()
    x = ArrayRecord({"w": Array(np.zeros(50_000, np.float32))})
    messages = list(guard.configure_train(1, x, ConfigRecord(), make_grid([1, 2, 3, 4])))
    assert messages[0].content["config"][KEY_CLIPPING_NORM] == 0.5  # the clients clip to C
    replies = [make_reply({"w": np.ones(50_000, np.float32)}, num_examples=1, node_id=i)
               for i in (1, 2, 3, 4)]
    arrays, metrics = guard.aggregate_train(1, replies)
    w = arrays["w"].numpy()
    assert float(w.std()) == pytest.approx(0.25, rel=0.01) and abs(float(w.mean()) - 1) < 0.01
    assert metrics[EPSILON_METRIC] == pytest.approx(user_level_epsilon(2.0, 1, 1e-5))
    # seeded: the same round gives the same noise
    again = dp_guard()[0]
    list(again.configure_train(1, x, ConfigRecord(), make_grid([1, 2, 3, 4])))
    np.testing.assert_array_equal(again.aggregate_train(1, replies)[0]["w"].numpy(), w)


def test_a_round_with_fewer_than_m_valid_replies_is_skipped():
    guard, wrapper = dp_guard(m=4)
    x = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    guard.configure_train(1, x, ConfigRecord(), make_grid([1, 2, 3, 4]))
    replies = [make_reply({"w": np.ones(3, np.float32)}, num_examples=1, node_id=i) for i in (1, 2, 3)]
    replies.append(make_reply({"w": np.full(3, np.nan, np.float32)}, num_examples=1, node_id=4))
    arrays, metrics = guard.aggregate_train(1, replies)
    assert arrays is None and metrics["round-aggregated"] == 0 and wrapper.releases == 0


def train_message(config: dict, w: np.ndarray) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(w)}), "config": ConfigRecord(config)})
    return Message(content, dst_node_id=5, message_type="train")


def test_client_gate_clips_the_update_only_when_asked():
    """Update (3, 4) (norm 5) from x = 0, C = 1: sent as (0.6, 0.8); without the clipping
    norm in the config the reply passes unchanged."""
    def handler(msg, context):
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.array([3.0, 4.0], np.float32))}),
                                   "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    x = np.zeros(2, np.float32)
    clipped = central_dp_gate(train_message({KEY_CLIPPING_NORM: 1.0}, x), context, handler)
    np.testing.assert_allclose(clipped.content["arrays"]["w"].numpy(), [0.6, 0.8], rtol=1e-6)
    plain = central_dp_gate(train_message({}, x), context, handler)
    np.testing.assert_allclose(plain.content["arrays"]["w"].numpy(), [3.0, 4.0])


def test_user_mode_client_reports_equal_weights_and_no_training_metrics(make_config):
    from fl_app import client_app, wire
    from fl_app.model import build_model
    from partitions import dataset_info

    cfg = make_config(dp=True, **{"dp-mode": "user"})
    model = build_model(dataset_info(cfg.dataset), seed=0)
    msg = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({
        wire.RUN_CONFIG: cfg.to_json(), wire.RUN_TAG: "run", wire.SERVER_ROUND: 1})}),
        dst_node_id=5, message_type="train")
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    metrics = client_app.train(msg, context).content["metrics"]
    assert metrics[wire.NUM_EXAMPLES] == 1
    assert wire.TRAIN_LOSS not in metrics and wire.DP_EPSILON not in metrics  # no DP-SGD here


@pytest.mark.parametrize("overrides, message", [
    ({"strategy": "scaffold"}, "a second, unclipped statistic"),
    ({"strategy": "krum", "min-train-nodes": 3}, "a robust rule"),
    ({"strategy": "fedmedian"}, "a robust rule"),
    ({"dp-max-epsilon": 5.0}, 'per-client budget of dp-mode "sample"'),
    ({"dp-mode": "central"}, "'dp-mode' must be one of ['sample', 'user']"),
])
def test_user_mode_refuses_what_breaks_its_guarantee(make_config, overrides, message):
    with pytest.raises(ValueError) as err:
        make_config(dp=True, **{"dp-mode": "user", **overrides})
    assert message in str(err.value)


def test_user_mode_target_and_delta_checks(make_config):
    from strategies.central_dp import check_user_run

    cfg = make_config(dp=True, **{"dp-mode": "user", "dp-target-epsilon": 4.0, "num-server-rounds": 20})
    sigma = user_noise(cfg)
    assert 3.96 <= user_level_epsilon(sigma, 20, 1e-5) <= 4.0
    with pytest.raises(ValueError, match="must be below 1/N"):
        check_user_run(make_config(dp=True, **{"dp-mode": "user", "dp-delta": 0.2}), 10)
    check_user_run(cfg, 10)
