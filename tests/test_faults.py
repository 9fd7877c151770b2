"""Faulty clients (fl_app/faults.py, a simulation-only test facility) against the server's
defences: the real ClientApp train handler and the real Guarded strategy, in one process.

Six digits clients, all sampled, min-train-nodes 2. At a rate the minimum tolerates
(0.3) every round aggregates, the model stays finite, and the round metrics count
exactly the faulty clients drawn from the seed; at rate 1 every round is skipped and the
model is the initial one."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

import strategies
from fl_common import wire
from fl_app.faults import FAULT_KINDS, corrupt_arrays, is_faulty
from fl_app.model import build_model
from partitions import dataset_info
from strategies.sampling import PartitionSampler
from tests.helpers import ClientAppGrid

N = 6


def _grid() -> ClientAppGrid:
    """N nodes (ids 100 + p) holding partitions p of N."""
    return ClientAppGrid({100 + p: Context(run_id=1, node_id=100 + p, state=RecordDict(),
                                           node_config={wire.PARTITION_ID: p,
                                                        wire.NUM_PARTITIONS: N}, run_config={})
                          for p in range(N)})


def run(cfg, rounds=2):
    info = dataset_info(cfg.dataset)
    initial = ArrayRecord(build_model(info, seed=0).state_dict())
    sampler = PartitionSampler(cfg.seed, lambda ids: {n: n - 100 for n in ids})
    strategy = strategies.guarded(cfg.strategy, strategies.build(cfg, N, total_examples=1000),
                                  sampler=sampler, min_valid_replies=cfg.min_train_nodes)
    history = []

    def record(server_round, arrays):
        if server_round:
            history.append((dict(strategy.last_train_metrics), arrays))

    config = ConfigRecord({wire.RUN_CONFIG: cfg.to_json(), wire.RUN_TAG: "faults"})
    strategy.start(_grid(), initial, num_rounds=rounds, timeout=float(cfg.round_timeout),
                   train_config=config, evaluate_config=ConfigRecord(config),
                   evaluate_fn=record)
    return initial, history


@pytest.mark.parametrize("kind", FAULT_KINDS[1:])
def test_tolerated_faults_are_left_out_counted_and_the_model_stays_finite(make_config, kind):
    # a timeout fault replies round-timeout + 2 s late; the others must never be that slow
    cfg = make_config(**{"fault-kind": kind, "fault-rate": 0.3,
                         "round-timeout": 3.0 if kind == "timeout" else 600.0,
                         "min-train-nodes": 2, "num-server-rounds": 2})
    _, history = run(cfg)
    for server_round, (metrics, arrays) in enumerate(history, start=1):
        faulty = sum(is_faulty(cfg.seed, server_round, p, 0.3) for p in range(N))
        assert 0 < faulty <= N - 2  # the seed draws faults the minimum tolerates
        lost = metrics[wire.REPLIES_MISSING] if kind == "timeout" else metrics[wire.REPLIES_REJECTED]
        assert lost == faulty and metrics[wire.REPLIES_VALID] == N - faulty
        assert metrics[wire.ROUND_AGGREGATED] == 1
        assert all(np.all(np.isfinite(a.numpy())) for a in arrays.values())


def test_faults_beyond_the_minimum_skip_every_round_and_keep_the_model(make_config):
    cfg = make_config(**{"fault-kind": "nan", "fault-rate": 1.0, "min-train-nodes": 2,
                         "num-server-rounds": 2})
    initial, history = run(cfg)
    for metrics, arrays in history:
        assert metrics[wire.ROUND_AGGREGATED] == 0 and metrics[wire.REPLIES_REJECTED] == N
        for key, array in arrays.items():
            np.testing.assert_array_equal(array.numpy(), initial[key].numpy())


def test_the_fault_draw_is_seeded_and_has_the_asked_rate():
    draws = [is_faulty(7, r, p, 0.3) for r in range(1, 101) for p in range(20)]
    assert draws == [is_faulty(7, r, p, 0.3) for r in range(1, 101) for p in range(20)]
    assert 0.27 < np.mean(draws) < 0.33  # 2000 draws: 3 standard deviations is 0.031
    assert not any(is_faulty(7, r, p, 0.0) for r in range(1, 20) for p in range(20))
    bad = corrupt_arrays("nan", {"a": np.ones((3, 2), np.float32), "b": np.ones(2)})
    assert np.isnan(bad["a"]).sum() == 1 and bad["b"].tolist() == [1.0, 1.0]
    assert corrupt_arrays("shapes", {"a": np.ones((3, 2))})["a"].shape == (2, 2)


def test_fault_settings_are_checked(make_config):
    with pytest.raises(ValueError, match="set both"):
        make_config(**{"fault-rate": 0.2})
    with pytest.raises(ValueError, match="set both"):
        make_config(**{"fault-kind": "nan"})
    with pytest.raises(ValueError, match=r"'fault-rate' must be in \[0, 1\]"):
        make_config(**{"fault-kind": "nan", "fault-rate": 1.5})
