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

from fl_app.user_dp_client import central_dp_gate
from strategies.user_dp import (
    EPSILON_METRIC,
    RECLIPPED_METRIC,
    UserLevelDP,
    user_level_epsilon,
    user_noise,
)
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


def dp_guard(m=4, sigma=2.0, clip=0.5, seed=0, randomness="secure", inner=None):
    wrapper = UserLevelDP(inner or FedAvg(min_train_nodes=1, min_available_nodes=1),
                          noise_multiplier=sigma, clipping_norm=clip, num_sampled_clients=m,
                          delta=1e-5, randomness=randomness, seed=seed)
    return Guarded(wrapper, min_valid_replies=m), wrapper


def test_server_adds_noise_of_std_sigma_clip_over_m_to_the_uniform_mean():
    """4 replies of 50,000 weights, each an update of norm 0.4 < C = 0.5 from x = 0: the
    aggregate is the mean update + N(0, (2 * 0.5 / 4)^2): sample std 0.25 within 1%."""
    guard, wrapper = dp_guard()
    n = 50_000
    x = ArrayRecord({"w": Array(np.zeros(n, np.float32))})
    messages = list(guard.configure_train(1, x, ConfigRecord(), make_grid([1, 2, 3, 4])))
    assert messages[0].content["config"][KEY_CLIPPING_NORM] == 0.5  # the clients clip to C
    step = 0.4 / np.sqrt(n)
    replies = [make_reply({"w": np.full(n, step, np.float32)}, num_examples=1, node_id=i)
               for i in (1, 2, 3, 4)]
    arrays, metrics = guard.aggregate_train(1, replies)
    w = arrays["w"].numpy()
    assert float(w.std()) == pytest.approx(0.25, rel=0.01) and abs(float(w.mean()) - step) < 0.005
    assert metrics[EPSILON_METRIC] == pytest.approx(user_level_epsilon(2.0, 1, 1e-5))
    assert metrics[RECLIPPED_METRIC] == 0


def test_updates_above_the_clipping_norm_are_clipped_by_the_server_too():
    """A client that did not clip (update (30, 40), norm 50, C = 1) counts as (0.6, 0.8):
    with sigma = 0 the release is exactly the mean of the clipped updates."""
    guard, wrapper = dp_guard(m=2, sigma=0.0, clip=1.0)
    x = ArrayRecord({"w": Array(np.array([1.0, 1.0], np.float32))})
    guard.configure_train(1, x, ConfigRecord(), make_grid([1, 2]))
    replies = [make_reply({"w": np.array([31.0, 41.0], np.float32)}, num_examples=1, node_id=1),
               make_reply({"w": np.array([1.2, 1.0], np.float32)}, num_examples=1, node_id=2)]
    arrays, metrics = guard.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [1 + (0.6 + 0.2) / 2, 1 + 0.8 / 2], rtol=1e-6)
    assert metrics[RECLIPPED_METRIC] == 1


# ---------------------------------------------------------------- the noise is secret
def _one_release(randomness, seed=0, server_round=3, n=20_000):
    """The release of one round (x = 0, 4 updates of norm 0.4, sigma 2, C 0.5)."""
    guard, _ = dp_guard(randomness=randomness, seed=seed)
    x = ArrayRecord({"w": Array(np.zeros(n, np.float32))})
    guard.configure_train(server_round, x, ConfigRecord(), make_grid([1, 2, 3, 4]))
    rng = np.random.default_rng(7)
    updates = [rng.normal(size=n) for _ in range(4)]
    updates = [(0.4 * u / np.linalg.norm(u)).astype(np.float32) for u in updates]
    replies = [make_reply({"w": u}, num_examples=1, node_id=i + 1) for i, u in enumerate(updates)]
    arrays, _ = guard.aggregate_train(server_round, replies)
    return arrays["w"].numpy().astype(np.float64), updates


def _client_attack(release, own_update, seed, server_round, m=4, std=0.25):
    """A client that knows the run config (seed) regenerates the server's noise, as the
    seeded code draws it, and subtracts it and its own update: the sum of the others."""
    from fl_common.randomness import derive_seed
    from strategies.user_dp import NOISE_TAG

    noise = np.random.RandomState(derive_seed(seed, server_round, NOISE_TAG)).normal(
        0.0, std, size=release.shape)
    return m * (release - noise) - own_update


def test_seeded_server_noise_lets_a_client_recover_the_others_sum():
    """The review's attack on dp-randomness = "seeded": it works (so the test can fail)."""
    release, updates = _one_release("seeded")
    others = sum(u.astype(np.float64) for u in updates[1:])
    recovered = _client_attack(release, updates[0], seed=0, server_round=3)
    assert np.abs(recovered - others).max() < 1e-5


def test_secure_server_noise_cannot_be_regenerated_from_the_config():
    """With the default (secure) the same attack leaves the full noise (m * std = 1 per
    coordinate) in the 'recovered' sum, and the same round twice gives other noise."""
    release, updates = _one_release("secure")
    others = sum(u.astype(np.float64) for u in updates[1:])
    error = _client_attack(release, updates[0], seed=0, server_round=3) - others
    assert float(error.std()) == pytest.approx(4 * 0.25 * np.sqrt(2), rel=0.05)
    again, _ = _one_release("secure")
    assert float(np.abs(again - release).mean()) > 0.1


# ---------------------------------------------------------------- post-processing
ALLOWED = ("fedavg", "fedprox", "fedadam", "fedavgm", "fedyogi", "fedadagrad")
DIM, M, C, SIGMA = 64, 4, 1.0, 1.0


def _stack(make_config, name, flower_wrapper=False):
    import strategies

    cfg = make_config(strategy=name, **{"min-train-nodes": 1})
    inner = strategies.build(cfg, num_clients=M)
    seen = []
    original = inner.aggregate_train

    def spy(server_round, replies):
        replies = list(replies)
        seen.append([r.content["arrays"]["w"].numpy().astype(np.float64) for r in replies])
        return original(server_round, replies)

    inner.aggregate_train = spy
    if flower_wrapper:
        from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

        return DifferentialPrivacyClientSideFixedClipping(inner, SIGMA, C, M), seen
    return UserLevelDP(inner, noise_multiplier=SIGMA, clipping_norm=C, num_sampled_clients=M,
                       delta=1e-5, randomness="seeded", seed=0), seen


def _updates(server_round, changed, scale=1e-4):
    """Round t's updates (norm ``scale`` <= C), the others' cancelling out in pairs (the
    review's setting: the mean stays near 0, so an adaptive optimizer's v stays small);
    ``changed``: client 0's update is replaced by its opposite."""
    rng = np.random.default_rng(server_round)
    out = []
    for _ in range(M // 2):
        u = rng.normal(size=DIM)
        u = scale * u / np.linalg.norm(u)
        out += [u, -u]
    if changed:
        out[0] = -out[0]
    return out


def _sensitivity(make_config, name, at_round, flower_wrapper=False):
    """||release_A - release_B|| / ||mean_A - mean_B||, where the two worlds are equal up
    to round at_round - 1 and differ in client 0's update at round at_round (both of norm
    C); the same noise in both worlds. 'release' is what the Gaussian noise is added to:
    here the input of the wrapped strategy, in Flower's wrapper its output."""
    results = []
    for changed in (False, True):
        wrapper, seen = _stack(make_config, name, flower_wrapper)
        x = np.zeros(DIM, np.float32)
        for t in range(1, at_round + 1):
            arrays = ArrayRecord({"w": Array(x)})
            list(wrapper.configure_train(t, arrays, ConfigRecord(), make_grid(list(range(1, M + 1)))))
            ups = _updates(t, changed and t == at_round)
            replies = [make_reply({"w": (x + u).astype(np.float32)}, num_examples=1, node_id=i + 1)
                       for i, u in enumerate(ups)]
            np.random.seed(t)  # Flower's wrapper draws from the global generator
            out, _ = wrapper.aggregate_train(t, replies)
            previous, x = x, out["w"].numpy()
        mean = previous.astype(np.float64) + sum(ups) / M
        release = x.astype(np.float64) if flower_wrapper else seen[-1][0]
        results.append((release, mean, len(seen[-1])))
    (ra, ma, na), (rb, mb, nb) = results
    return float(np.linalg.norm(ra - rb) / np.linalg.norm(ma - mb)), max(na, nb)


@pytest.mark.parametrize("name", ALLOWED)
def test_the_release_has_the_sensitivity_of_the_mean_for_every_allowed_strategy(make_config, name):
    """What the noise is added to moves exactly as much as the mean of the clipped
    updates when one client's update changes, in round 1 and after 30 rounds of the
    server optimizer's state; and the wrapped strategy sees one reply: the release."""
    for at_round in (1, 5, 30):
        ratio, replies_seen = _sensitivity(make_config, name, at_round)
        assert ratio == pytest.approx(1.0, abs=5e-3), (name, at_round)  # float32 release
        assert replies_seen == 1


def test_the_harness_finds_flowers_output_noise_too_weak_under_an_adaptive_optimizer(make_config):
    """The same measurement on Flower's client-side fixed-clipping wrapper (what this app
    used before), which noises the wrapped strategy's output: right for FedAvg, but under
    FedAdagrad the noised output moves ~9.9x more than the mean (near eta / tau = 10),
    i.e. the noise multiplier is ~sigma / 10 in effect. So the test above can fail."""
    assert _sensitivity(make_config, "fedavg", 30, flower_wrapper=True)[0] == pytest.approx(1.0, abs=5e-3)
    assert _sensitivity(make_config, "fedadagrad", 5, flower_wrapper=True)[0] > 5.0


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
    from fl_app import client_app
    from fl_common import wire
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
    from strategies.user_dp import check_user_run

    cfg = make_config(dp=True, **{"dp-mode": "user", "dp-target-epsilon": 4.0, "num-server-rounds": 20})
    sigma = user_noise(cfg)
    assert 3.96 <= user_level_epsilon(sigma, 20, 1e-5) <= 4.0
    with pytest.raises(ValueError, match="must be below 1/N"):
        check_user_run(make_config(dp=True, **{"dp-mode": "user", "dp-delta": 0.2}), 10)
    check_user_run(cfg, 10)


def test_the_target_epsilon_caps_the_releases(make_config):
    """sigma for 2 releases at epsilon 3: a third round (a resumed run given more rounds)
    releases nothing and leaves the model unchanged."""
    cfg = make_config(dp=True, **{"dp-mode": "user", "dp-target-epsilon": 3.0, "num-server-rounds": 2})
    sigma = user_noise(cfg)
    wrapper = UserLevelDP(FedAvg(min_train_nodes=1, min_available_nodes=1), noise_multiplier=sigma,
                          clipping_norm=1.0, num_sampled_clients=2, delta=1e-5, max_epsilon=3.0)
    x = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    for rnd in (1, 2, 3):
        list(wrapper.configure_train(rnd, x, ConfigRecord(), make_grid([1, 2])))
        replies = [make_reply({"w": np.full(4, 0.1, np.float32)}, num_examples=1, node_id=i) for i in (1, 2)]
        arrays, metrics = wrapper.aggregate_train(rnd, replies)
        assert (arrays is None) == (rnd == 3)
    assert wrapper.releases == 2 and metrics[EPSILON_METRIC] <= 3.0
