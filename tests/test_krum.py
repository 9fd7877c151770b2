"""Krum and Multi-Krum: hand-computed scores, agreement with Flower's selection, the
n = 2f + 3 boundary, float32 cancellation, and refusal of what cannot be guaranteed;
Bulyan's record of what its Multi-Krum stage kept (``RecordingBulyan.last_selected``)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp.strategy.multikrum import compute_distances, select_multikrum

import strategies
from strategies.guard import Guarded
from strategies.krum import (
    Krum,
    MultiKrum,
    flatten_updates,
    krum_scores,
    pairwise_sq_distances,
    select,
)
from tests.helpers import make_grid, make_reply


def test_scores_and_selection_by_hand():
    """1-D updates 0, 1, 3, 10, 11, f = 1: each score sums the n - f - 2 = 2 nearest squared
    distances: 0 -> 1 + 9 = 10; 1 -> 1 + 4 = 5; 3 -> 4 + 9 = 13; 10 -> 1 + 49 = 50;
    11 -> 1 + 64 = 65. Krum picks 1; Multi-Krum with m = 3 picks 1, 0, 3."""
    updates = np.array([[0.0], [1.0], [3.0], [10.0], [11.0]])
    scores = krum_scores(pairwise_sq_distances(updates), num_malicious=1)
    np.testing.assert_allclose(scores, [10, 5, 13, 50, 65])
    assert list(select(scores, 1)) == [1]
    assert list(select(scores, 3)) == [1, 0, 2]


def krum_round(strategy, models, x, num_examples=None):
    num_examples = num_examples or [10] * len(models)
    strategy.configure_train(1, ArrayRecord({"w": Array(x)}), ConfigRecord(),
                             make_grid(list(range(1, len(models) + 1))))
    replies = [make_reply({"w": m}, num_examples=n, node_id=i + 1)
               for i, (m, n) in enumerate(zip(models, num_examples))]
    return strategy.aggregate_train(1, replies)


def test_multikrum_aggregate_is_the_weighted_mean_of_the_selected_replies():
    """Same five points, m = 3, weights 1, 3, 4 on the selected 0, 1, 3:
    (0*1 + 1*3 + 3*4) / 8 = 15/8."""
    models = [np.array([v], np.float32) for v in (0.0, 1.0, 3.0, 10.0, 11.0)]
    strategy = MultiKrum(num_malicious=1, num_selected=3, min_train_nodes=1, min_available_nodes=1)
    arrays, metrics = krum_round(strategy, models, np.zeros(1, np.float32), [1, 3, 4, 5, 6])
    np.testing.assert_allclose(arrays["w"].numpy(), [15 / 8])
    assert metrics["krum-selected"] == 3 and strategy.last_selected == [2, 1, 3]
    krum, _ = krum_round(Krum(num_malicious=1, min_train_nodes=1, min_available_nodes=1),
                         models, np.zeros(1, np.float32))
    np.testing.assert_allclose(krum["w"].numpy(), [1.0])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("f, m", [(0, 1), (1, 1), (2, 1), (2, 4), (3, 5)])
def test_selection_agrees_with_flowers_on_random_replies(seed, f, m):
    """Well-conditioned random models (no cancellation): the same replies as Flower's
    ``select_multikrum`` (as a set; Flower orders by score too)."""
    rng = np.random.default_rng(seed)
    n = 2 * f + 3 + seed
    x = rng.normal(size=50).astype(np.float32)
    models = [x + rng.normal(scale=rng.uniform(0.5, 2.0), size=50).astype(np.float32)
              for _ in range(n)]
    strategy = MultiKrum(num_malicious=f, num_selected=m, min_train_nodes=1, min_available_nodes=1)
    krum_round(strategy, models, x)
    contents = [RecordDict({"arrays": ArrayRecord({"w": Array(v)})}) for v in models]
    theirs = select_multikrum(contents, f, m)
    assert sorted(strategy.last_selected) == sorted(contents.index(c) + 1 for c in theirs)


def cancellation_case():
    """7 float32 models of 20,000 weights near 100: 5 honest ones (noise 1e-3) and 2
    attackers shifted by 0.02 together. Exact squared distances: ~0.04 among honest ones,
    ~8 from an attacker to an honest one. Flower's float32 ||a||^2 + ||b||^2 - 2a.b has an
    error of ~1e2 here, more than the distances themselves."""
    rng = np.random.default_rng(0)
    d, x = 20_000, np.full(20_000, 100.0, np.float32)
    honest = [x + rng.normal(0, 1e-3, d).astype(np.float32) for _ in range(5)]
    attackers = [x + np.float32(0.02) + rng.normal(0, 1e-3, d).astype(np.float32) for _ in range(2)]
    return x, attackers + honest


def test_float64_update_distances_survive_where_flowers_cancel():
    x, models = cancellation_case()
    records = [ArrayRecord({"w": Array(m)}) for m in models]
    exact = np.array([[np.sum((a.astype(np.float64) - b.astype(np.float64)) ** 2) for b in models]
                      for a in models])
    ours = pairwise_sq_distances(flatten_updates(records, {"w": x}))
    np.testing.assert_allclose(ours, exact, rtol=1e-9, atol=1e-12)
    assert np.abs(compute_distances(records) - exact).max() > 10  # Flower's: noise
    # and it matters: Flower's Krum picks an attacker, ours an honest model
    strategy = Krum(num_malicious=2, min_train_nodes=1, min_available_nodes=1)
    krum_round(strategy, models, x)
    contents = [RecordDict({"arrays": r}) for r in records]
    assert contents.index(select_multikrum(contents, 2, 1)[0]) in (0, 1)
    assert strategy.last_selected[0] - 1 >= 2
    assert strategy.last_selected[0] - 1 == int(select(krum_scores(exact, 2), 1)[0])


@pytest.mark.parametrize("f", [0, 1, 2])
def test_boundary_n_equals_2f_plus_3_aggregates_and_one_fewer_skips(f):
    x = np.zeros(3, np.float32)
    rng = np.random.default_rng(f)
    models = [rng.normal(size=3).astype(np.float32) for _ in range(2 * f + 3)]
    arrays, metrics = krum_round(Krum(num_malicious=f, min_train_nodes=1, min_available_nodes=1),
                                 models, x)
    assert arrays is not None and metrics["krum-skipped"] == 0
    arrays, metrics = krum_round(Krum(num_malicious=f, min_train_nodes=1, min_available_nodes=1),
                                 models[:-1], x)
    assert arrays is None and metrics["krum-skipped"] == 1


def test_behind_the_guard_a_skipped_round_leaves_the_model_and_is_recorded():
    x = np.zeros(2, np.float32)
    guard = Guarded(Krum(num_malicious=1, min_train_nodes=1, min_available_nodes=1))
    guard.configure_train(1, ArrayRecord({"w": Array(x)}), ConfigRecord(), make_grid([1, 2, 3, 4]))
    replies = [make_reply({"w": np.full(2, i, np.float32)}, node_id=i) for i in (1, 2, 3, 4)]
    arrays, metrics = guard.aggregate_train(1, replies)
    assert arrays is None and metrics["krum-skipped"] == 1 and metrics["round-aggregated"] == 0


def test_auto_m_is_n_minus_f():
    """m = n - f = 4 of 5 with f = 1: the farthest point (score 65) is the one left out."""
    models = [np.array([v], np.float32) for v in (0.0, 1.0, 3.0, 10.0, 11.0)]
    strategy = MultiKrum(num_malicious=1, num_selected=None, min_train_nodes=1, min_available_nodes=1)
    arrays, _ = krum_round(strategy, models, np.zeros(1, np.float32))
    np.testing.assert_allclose(arrays["w"].numpy(), [(0 + 1 + 3 + 10) / 4])


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_malicious=-1), "num_malicious"), (dict(num_selected=0), "num_selected"),
])
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiKrum(**kwargs)


def test_a_feasible_config_passes(make_config):
    """f = 2 needs 7 replies; fraction 0.5 of 10 nodes samples max(5, min-train-nodes 7) = 7."""
    cfg = make_config(strategy="krum", **{"num-malicious": 2, "min-train-nodes": 7,
                                          "fraction-train": 0.5})
    strategies.check_feasible(cfg, 10)


@pytest.mark.parametrize("overrides, nodes, message", [
    ({"strategy": "krum", "num-malicious": 2, "min-train-nodes": 7}, 6, "only 6 of the 6 nodes"),
    ({"strategy": "bulyan", "num-malicious": 1, "min-train-nodes": 7}, 6, "needs at least 7"),
    ({"strategy": "multikrum", "num-malicious": 1, "min-train-nodes": 5, "num-selected": 5,
      "fraction-train": 0.5}, 10, "'num-selected' = 5 exceeds n - f = 5 - 1"),
])
def test_infeasible_configs_fail_before_training(make_config, overrides, nodes, message):
    cfg = make_config(**overrides)
    with pytest.raises(ValueError) as err:
        strategies.check_feasible(cfg, nodes)
    assert message in str(err.value)


@pytest.mark.parametrize("strategy, f, need", [("krum", 1, 5), ("multikrum", 2, 7), ("bulyan", 1, 7)])
def test_min_train_nodes_below_the_requirement_is_refused(make_config, strategy, f, need):
    with pytest.raises(ValueError) as err:
        make_config(strategy=strategy, **{"num-malicious": f, "min-train-nodes": need - 1})
    assert f"needs at least {need} valid replies" in str(err.value)
    make_config(strategy=strategy, **{"num-malicious": f, "min-train-nodes": need})


def test_the_refusal_names_the_largest_f_a_federation_allows():
    """num-malicious = 5 of 10 clients (the deployment review's probe): the advice
    'min-train-nodes >= 13' alone was refused by the next check; the message also names the
    largest f for 10 and 20 clients sampled, by hand: Krum n >= 2f + 3 gives 3 and 8,
    Bulyan n >= 4f + 3 gives 1 and 4."""
    from fl_app.config import RunConfig, default_run_config

    for strategy, largest in [("krum", "at most 3 for 10, 8 for 20"),
                              ("bulyan", "at most 1 for 10, 4 for 20")]:
        with pytest.raises(ValueError) as err:
            RunConfig.from_mapping({**default_run_config(), "strategy": strategy,
                                    "num-malicious": 5})
        assert largest in str(err.value)


def test_distances_leave_the_input_alone_unless_told():
    updates = np.array([[1.0, 2.0], [3.0, 5.0], [0.0, 0.0]])
    before = updates.copy()
    a = pairwise_sq_distances(updates)
    np.testing.assert_array_equal(updates, before)
    np.testing.assert_allclose(a[0], [0.0, 13.0, 5.0])  # (2^2 + 3^2), (1 + 4)
    np.testing.assert_allclose(pairwise_sq_distances(updates, overwrite=True), a)
    assert not np.array_equal(updates, before)  # centred in place


@pytest.mark.parametrize("strategy, line", [
    (Krum(num_malicious=2), "Krum: f = 2, m = 1 (n >= 7 replies per round)"),
    (MultiKrum(num_malicious=3), "Multi-Krum: f = 3, m = n - f (n >= 9 replies per round)"),
    (MultiKrum(num_malicious=1, num_selected=4), "Multi-Krum: f = 1, m = 4 (n >= 5 replies per round)"),
])
def test_summary_names_f_m_and_the_replies_needed(strategy, line, caplog):
    """Flower logs summary() at the start of a run: it must say which rule, f, m and the
    n >= 2f + 3 the rule needs, then FedAvg's sampling settings."""
    with caplog.at_level("INFO", logger="flwr"):
        strategy.summary()
    lines = [r.getMessage() for r in caplog.records if r.name == "flwr"]
    assert any(line in message for message in lines), lines
    assert any("Minimum nodes: train (2)" in message for message in lines), lines


# ---------------------------------------------------------------- Bulyan's selection record
def bulyan_case():
    """8 replies of a 6-weight model, f = 1 (n >= 4f + 3 = 7): 7 honest replies around
    0.5 (noise 0.1, one of them, node 106, farther off at +0.3) and one far outlier
    (node 104, +10). Multi-Krum keeps theta = n - 2f = 6."""
    rng = np.random.default_rng(7)
    node_ids = [101, 102, 103, 104, 105, 106, 107, 108]
    models = []
    for node in node_ids:
        shift = {104: 10.0, 106: 0.3}.get(node, 0.0)
        w = (0.5 + shift + rng.normal(0, 0.1, 4)).astype(np.float32)
        b = (0.5 + shift + rng.normal(0, 0.1, 2)).astype(np.float32)
        models.append({"w": w, "b": b})
    return node_ids, models


def kept_by_hand(models, f, theta):
    """Krum scores by their definition (float64, explicit pairs): each reply's sum of the
    n - f - 2 smallest squared distances to the others; the theta lowest are kept."""
    flat = [np.concatenate([m["w"], m["b"]]).astype(np.float64) for m in models]
    n = len(flat)
    scores = []
    for i in range(n):
        dist = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(dist[:n - f - 2]))
    return sorted(range(n), key=lambda i: scores[i])[:theta]


def bulyan_replies(node_ids, models):
    """Real reply Messages (as the server receives them: over the wire), from each node."""
    from flwr.app import Message, MetricRecord

    from tests.helpers import wire_roundtrip

    replies = []
    for node, model in zip(node_ids, models):
        ask = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
        content = RecordDict({"arrays": ArrayRecord({k: Array(v.copy()) for k, v in model.items()}),
                              "metrics": MetricRecord({"num-examples": 10})})
        replies.append(wire_roundtrip(Message(content, reply_to=ask)))
    return replies


def test_bulyan_records_exactly_the_replies_its_multikrum_stage_kept():
    from flwr.serverapp.strategy import Bulyan

    from strategies.bulyan import RecordingBulyan

    node_ids, models = bulyan_case()
    kept = kept_by_hand(models, f=1, theta=6)
    expected = sorted(node_ids[i] for i in kept)
    assert 104 not in expected and 106 not in expected and len(expected) == 6  # the case's point
    ours = RecordingBulyan(num_malicious_nodes=1, min_train_nodes=1, min_available_nodes=1)
    arrays, metrics = ours.aggregate_train(1, bulyan_replies(node_ids, models))
    assert sorted(ours.last_selected) == expected
    assert len(ours.last_selected) == len(set(ours.last_selected)) == 6
    # the aggregate is Flower's own Bulyan's on the same replies (fresh copies: Flower's
    # Bulyan empties the selected replies' ArrayRecords while it aggregates)
    flower_arrays, flower_metrics = Bulyan(num_malicious_nodes=1, min_train_nodes=1,
                                           min_available_nodes=1).aggregate_train(
        1, bulyan_replies(node_ids, models))
    assert list(arrays.keys()) == list(flower_arrays.keys()) == ["w", "b"]
    for key in ("w", "b"):
        np.testing.assert_array_equal(arrays[key].numpy(), flower_arrays[key].numpy())
        # and it is honest: the outlier's +10 is nowhere near it
        assert np.all(np.abs(arrays[key].numpy() - 0.5) < 0.5)
    assert dict(metrics) == dict(flower_metrics)
    # a second round records its own selection, not the first one's
    ours.aggregate_train(2, bulyan_replies(node_ids[::-1], models))
    assert sorted(ours.last_selected) == sorted(node_ids[::-1][i] for i in kept)


def test_bulyan_behind_the_guard_reports_the_attackers_it_kept(make_config):
    """As the server runs it (built from the run config, under the attack counter and the
    guard): node 104 (partition 3) attacks and Bulyan's selection drops it, so
    attackers-selected is 0 while attackers-sampled is 1."""
    from strategies.attack_sim import AttackSimulation
    from strategies.sampling import PartitionSampler

    node_ids, models = bulyan_case()
    cfg = make_config(strategy="bulyan", **{"num-malicious": 1, "min-train-nodes": 8})
    partition_of = {node: node - 101 for node in node_ids}
    base = strategies.build(cfg, 8)
    attack = AttackSimulation(base, attack="sign-flip", attackers=frozenset({3}),
                              partition_of=partition_of.get,
                              selected=lambda: base.last_selected)
    guard = strategies.guarded("bulyan", base, inner=attack, min_valid_replies=8,
                               sampler=PartitionSampler(cfg.seed, lambda ids: dict(partition_of)))
    x = {k: np.full_like(v, 0.5) for k, v in models[0].items()}
    guard.configure_train(1, ArrayRecord({k: Array(v) for k, v in x.items()}), ConfigRecord(),
                          make_grid(node_ids))
    _, metrics = guard.aggregate_train(1, bulyan_replies(node_ids, models))
    expected = sorted(node_ids[i] for i in kept_by_hand(models, f=1, theta=6))
    assert sorted(base.last_selected) == expected
    assert metrics["attackers-sampled"] == 1 and metrics["attackers-selected"] == 0
    assert metrics["round-aggregated"] == 1 and metrics["replies-valid"] == 8
