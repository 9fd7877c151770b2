"""Membership inference (experiments/membership.py): the metrics by hand, and the attacks
must infer membership when nothing protects the model (an overfit MLP)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from experiments import membership as mi


def test_roc_auc_by_hand():
    assert mi.roc_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert mi.roc_auc([1, 2, 3, 4], [1, 1, 0, 0]) == 0.0
    # members 2 and 4 against non-members 1 and 3: 3 of the 4 pairs ordered right
    assert mi.roc_auc([1, 2, 3, 4], [0, 1, 0, 1]) == 0.75
    assert mi.roc_auc([5, 5, 5, 5], [0, 1, 0, 1]) == 0.5  # ties count 1/2
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=500), rng.random(500) < 0.4
    s[y] += 0.5
    pairs = np.mean([(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]])
    assert mi.roc_auc(s, y) == pytest.approx(pairs)


def test_tpr_at_fpr_by_hand():
    non_members = np.arange(1000.0)  # 0..999
    members = np.array([995.5, 990.0, 989.5, 500.0])
    scores = np.concatenate([non_members, members])
    labels = np.concatenate([np.zeros(1000, bool), np.ones(4, bool)])
    # 10 false positives allowed (990..999): the lowest such threshold is just above 989,
    # so 995.5, 990.0 and 989.5 are flagged, 500 is not
    r = mi.tpr_at_fpr(scores, labels, 1e-2)
    assert r["false_positives"] == 10 and r["fpr"] == 0.01
    assert r["true_positives"] == 3 and r["tpr"] == 0.75
    r = mi.tpr_at_fpr(scores, labels, 1e-3)  # one allowed: 999
    assert r["false_positives"] == 1 and r["true_positives"] == 0
    assert r["tpr_ci95"] == [0.0, pytest.approx(1 - 0.025 ** (1 / 4))]
    # ties at the top: no threshold keeps 1 of 5 tied non-members, so none is flagged
    tied = np.concatenate([np.arange(95.0), [100.0] * 5, [100.0, 99.5]])
    r = mi.tpr_at_fpr(tied, np.arange(102) >= 100, 1e-2)
    assert (r["false_positives"], r["true_positives"]) == (0, 0)


def test_loss_attack_ranks_as_the_loss():
    """phi (what the loss attack thresholds) orders examples exactly as -loss does."""
    rng = np.random.default_rng(2)
    logits = torch.from_numpy(rng.normal(0, 3, (200, 10)))
    y = torch.from_numpy(rng.integers(0, 10, 200))
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="none").numpy()
    phi = mi.logit_confidence(logits, y)
    assert np.array_equal(np.argsort(phi), np.argsort(-loss))
    assert loss == pytest.approx(np.log1p(np.exp(-phi)))


def test_logit_confidence():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    p = torch.softmax(logits.double(), 1)
    want = [math.log(p[0, 0] / (1 - p[0, 0])), math.log(1 / 2)]
    assert mi.logit_confidence(logits, y) == pytest.approx(want)


def test_lira_on_synthetic_confidences():
    """Members' confidence is 1 above the example's own OUT level: LiRA separates them
    though the examples' levels differ by much more than 1 (the loss attack would not)."""
    rng = np.random.default_rng(0)
    models, n = 16, 400
    level = rng.normal(0, 5, n)
    masks = rng.random((models, n)) < 0.5
    conf = level[None, :] + masks * 1.0 + rng.normal(0, 0.3, (models, n))
    offline, online = zip(*(mi.lira_scores(conf, masks, m) for m in range(models)))
    labels = masks.flatten()
    assert mi.roc_auc(np.concatenate(offline), labels) > 0.9
    assert mi.roc_auc(np.concatenate(online), labels) > 0.9
    assert mi.roc_auc(conf.flatten(), labels) < 0.6  # the raw statistic: the levels drown it


def test_attacks_infer_membership_of_an_overfit_model():
    """Eight MLPs trained by train_local on random halves of 200 digits, 30 epochs, no DP:
    they fit their training data exactly; measured: loss AUC 0.66, LiRA online 0.73."""
    torch.set_num_threads(1)
    r = mi.run_config(mi.MIConfig("test-overfit", models=8, pool=200, epochs=30),
                      log=lambda *_: None)
    assert r["train_accuracy_mean"] == 1.0
    assert r["attacks"]["loss"]["auc"] > 0.6
    assert r["attacks"]["lira_online"]["auc"] > 0.65
    assert r["attacks"]["loss"]["auc_ci95"][0] > 0.55


def test_the_federated_target_is_fedavg_of_the_apps_local_training():
    """One round, two clients: the global model is the example-weighted mean of what
    train_local makes of the same initial model on each client's data, and client 0's
    model is its own local result (computed here independently)."""
    import copy

    from fl_app.model import build_model
    from fl_app.training import train_local
    from partitions import ImageArrays, dataset_info

    torch.set_num_threads(1)
    cfg = mi.MIConfig("t", models=1, pool=60, epochs=2, clients=2, rounds=1)
    pool, rest = mi.load_pool(60, 0, others=30)
    target = ImageArrays(pool.x[:20], pool.y[:20])  # 20 against the other client's 30
    global_model, client_model, _ = mi.train_federation(cfg, target, [rest], index=3)
    init = build_model(dataset_info("digits"), 3, kind="mlp")
    states = []
    for c, data in enumerate([target, rest]):
        local = copy.deepcopy(init)
        train_local(local, data, epochs=2, batch_size=32, lr=0.05, momentum=0.9,
                    seed=3 * 1000 + c)
        states.append(local.state_dict())
    for key, value in global_model.state_dict().items():
        torch.testing.assert_close(value, 0.4 * states[0][key] + 0.6 * states[1][key])
        torch.testing.assert_close(client_model.state_dict()[key], states[0][key])
    assert not torch.equal(states[0][key], states[1][key])


def test_membership_leaks_from_a_federated_model_and_a_clients_update():
    """Client 0 of a FedAvg federation of 3 (random halves of 200 digits against two
    fixed clients of 100), 6 rounds of 4 local epochs, no DP: LiRA infers membership from
    the final global model and from client 0's last model (global + its update);
    measured: AUC 0.61 [0.58, 0.63] and 0.60 [0.57, 0.62] (chance: 0.5)."""
    torch.set_num_threads(1)
    r = mi.run_config(mi.MIConfig("test-fed", models=8, pool=200, epochs=4, clients=3,
                                  rounds=6), log=lambda *_: None)
    assert r["train_accuracy_mean"] > 0.97 and r["test_accuracy_mean"] > 0.85
    for target in ("global model", "client 0's update"):
        assert r["attacks"][f"{target}: lira_online"]["auc"] > 0.57
        assert r["attacks"][f"{target}: lira_online"]["auc_ci95"][0] > 0.53


def _record(name, eps, clients, acc, users=0):
    metrics = {"auc": 0.5, "auc_ci95": [0.49, 0.51],
               "tpr_at_fpr_0.001": {"tpr": 0.002, "tpr_ci95": [0.0, 0.004]}}
    family = "user" if users else "example"
    return {"config": {"name": name, "clients": clients, "users": users, "delta": 1e-5,
                       "rounds": 10},
            "epsilon_max": eps, "test_accuracy_mean": acc, "models": [{"sigma": 12.8125}],
            "attacks": {f"{t}: {a}": metrics for t in mi.FIGURE_TARGETS[family]
                        for a in ("loss", mi.FIGURE_ATTACK)}}


def test_the_joint_figure_orders_the_federations_by_epsilon(tmp_path):
    """Only federated configurations are drawn, by epsilon, no DP last; one is not a curve."""
    records = [_record("fed-nodp", None, 4, 0.95), _record("nodp", None, 1, 0.96),
               _record("fed-dp-eps8", 7.99, 4, 0.72), _record("fed-dp-eps1", 0.99, 4, 0.25),
               _record("user-dp-eps1", 1.0, 1, 0.5, users=64),
               _record("user-nodp", None, 1, 0.9, users=64)]
    points = mi.curve_points(records)
    assert [p["name"] for p in points] == ["fed-dp-eps1", "fed-dp-eps8", "fed-nodp"]
    assert [p["test_accuracy"] for p in points] == [0.25, 0.72, 0.95]
    assert set(points[0]["attacks"]) == set(mi.FIGURE_TARGETS["example"])
    users = mi.curve_points(records, "user")
    assert [p["name"] for p in users] == ["user-dp-eps1", "user-nodp"]
    # replacing one of m users: sigma / 2 over the same 10 releases (measured: 2.135)
    assert users[0]["bound_epsilon"] == pytest.approx(2.135, abs=0.01)
    assert points[0]["bound_epsilon"] == 0.99  # adding or removing an example: the claim
    assert mi.write_figure(records, tmp_path / "user.png", "user")
    assert mi.write_figure(records, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 10_000
    assert not mi.write_figure(records[:2], tmp_path / "one.png")
    assert not (tmp_path / "one.png").exists()


def test_a_user_federation_is_the_uniform_mean_or_the_apps_dp_fedavg_release():
    """One round, 2 users: without DP the global model is x + the uniform mean of the two
    ``train_local`` updates; with DP it is x + the app's UserLevelDP release of the same
    updates (re-clipped to C, noise of std sigma C / m from the seeded stream), and the
    accountant's epsilon is the target's."""
    torch.set_num_threads(1)
    from types import SimpleNamespace

    from flwr.serverapp.strategy import FedAvg

    from fl_app.model import build_model
    from fl_app.training import train_local
    from partitions import ImageArrays, dataset_info
    from strategies.user_dp import UserLevelDP, user_noise

    pool, _ = mi.load_pool(30, 0)
    users = [ImageArrays(pool.x[:15], pool.y[:15]), ImageArrays(pool.x[15:], pool.y[15:])]
    for eps in (0.0, 4.0):
        cfg = mi.MIConfig("t", eps, users=2, per_user=15, epochs=2, rounds=1)
        got, info = mi.train_user_federation(cfg, users, index=3)
        x = build_model(dataset_info("digits"), 3, kind="mlp")
        start = {k: v.double().numpy() for k, v in x.state_dict().items()}
        updates = []
        for u, d in enumerate(users):
            local = build_model(dataset_info("digits"), 3, kind="mlp")
            train_local(local, d, epochs=2, batch_size=32, lr=0.05, momentum=0.9,
                        seed=3 * 1000 + 100 + u)
            updates.append({k: v.double().numpy() - start[k] for k, v in local.state_dict().items()})
        if eps == 0:
            step = {k: (updates[0][k] + updates[1][k]) / 2 for k in start}
        else:
            sigma = user_noise(SimpleNamespace(dp_target_epsilon=4.0, dp_delta=1e-5,
                                               num_server_rounds=1))
            ref = UserLevelDP(FedAvg(), noise_multiplier=sigma, clipping_norm=1.0,
                              num_sampled_clients=2, delta=1e-5, randomness="seeded", seed=3)
            step, _ = ref.release(1, updates)
            assert info["noise_std"] == pytest.approx(sigma * 1.0 / 2)
            assert info["epsilon"] == pytest.approx(4.0, rel=1e-2)
            assert info["noise_std"] > 0.5  # 1 release at epsilon 4: sigma about 1.2
        for k, v in got.state_dict().items():
            np.testing.assert_allclose(v.double().numpy(), (start[k] + step[k]).astype(np.float32),
                                       rtol=0, atol=1e-6)


def test_client_membership_leaks_without_dp():
    """LiRA on a user's mean confidence infers which users trained the federation: 8
    federations of 12 of 24 users (15 digits each), 6 rounds of 5 epochs, no DP; measured
    AUC 0.74."""
    torch.set_num_threads(1)
    cfg = mi.MIConfig("t", models=8, users=24, per_user=15, epochs=5, rounds=6)
    record = mi.run_config(cfg, log=lambda *_: None)
    assert record["trials"] == 8 * 24 and record["members"] == 8 * 12
    online = record["attacks"]["global model, users: lira_online"]
    assert online["auc"] > 0.65, online["auc"]
    assert online["auc_ci95"][0] > 0.55


def test_epsilon_bounds_find_a_leak_and_none_without_one():
    """The attacks' trials turned into the audit's lower bound: members whose confidence is
    shifted by 3 standard deviations give a bound far above 0; members drawn like the
    non-members give none (at most a small value, the rule chosen on the other half)."""
    rng = np.random.default_rng(0)
    masks = rng.random((16, 400)) < 0.5
    record = {"config": {"delta": 1e-5}}
    leaky = rng.normal(size=(16, 400)) + 3.0 * masks
    same = rng.normal(size=(16, 400))
    bounds = mi.epsilon_bounds(record, {"masks": masks, "confidences": leaky})
    assert set(bounds) == {"loss", "lira_offline", "lira_online"}
    assert bounds["loss"]["epsilon_lower_bound"] > 1.5
    none = mi.epsilon_bounds(record, {"masks": masks, "confidences": same})
    assert max(b["epsilon_lower_bound"] for b in none.values()) < 0.3


def test_a_threshold_chosen_on_half_the_models_is_applied_to_the_others():
    """Members far above non-members: the rule at FPR 1e-2 chosen on models 0-7 flags
    nearly every member of models 8-15 and few of their non-members, and both ways round
    count every trial of the other half."""
    rng = np.random.default_rng(1)
    masks = rng.random((16, 400)) < 0.5
    arrays = {"masks": masks, "confidences": rng.normal(size=(16, 400)) + 4.0 * masks}
    both = mi.held_out_threshold({"config": {}}, arrays, "loss", 1e-2)
    assert [b["chosen_on_models"] for b in both] == [[0, 8], [8, 16]]
    for b, rows in zip(both, (slice(8, 16), slice(0, 8))):
        assert b["members"] == masks[rows].sum() and b["non_members"] == (~masks[rows]).sum()
        assert b["members_flagged"] > 0.5 * b["members"]
        assert b["non_members_flagged"] < 0.05 * b["non_members"]
