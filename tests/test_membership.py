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
