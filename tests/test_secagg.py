"""SecAgg+ for Message-API strategies (strategies/secagg.py, fl_app/secagg_client.py).

The server half runs against Flower's real ``secaggplus_mod`` on in-process nodes: every
message is serialized and parsed again (Flower's own protobuf serde), as between a
SuperLink and a SuperNode, and each node keeps its own ``Context.state``. The train
handler is a stand-in that returns fixed arrays, so that the secure aggregate can be set
against the plain one of the same replies.

Quantization bound used below (per coordinate; ``strategies/secagg.py``): each client's
weighted value r_i v_i / T is rounded stochastically to a grid of step 2c/T, so the
weighted mean is off by at most m * (2c/T) / (sum_i r_i / T) = 2 c m / sum_i r_i, plus the
effect of the weights themselves being rounded to r_i / T (at most |v| * m / sum_i r_i).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp.strategy import FedAvg

from fl_common import wire
from fl_app.secagg_client import clipped_count, upload_arrays
from strategies.fedadam import FedAdam
from strategies.guard import ExampleLimits, Guarded
from strategies.scaffold import DC_PREFIX, Scaffold
from strategies.secagg import (
    DROPOUTS,
    SECAGG_RECORD,
    SURVIVORS,
    SecAggSettings,
    SecureAggregationGrid,
    neighbourhoods,
    settings_problems,
)
from strategies.validation import array_spec
from tests.helpers import LoopbackGrid, Node

NODES = [101, 102, 103, 104, 105, 106, 107]
SHAPES = {"w": (6, 5), "b": (5,)}


def settings(**overrides) -> SecAggSettings:
    base = dict(num_shares=5, threshold=3, clipping_range=8.0, quantization_range=2**22,
                max_weight=100.0, timeout=30.0)
    return SecAggSettings(**{**base, **overrides})


def model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def run_config_json(defaults: dict, **overrides) -> str:
    return json.dumps({**defaults, **overrides})


def make_nodes(updates: dict[int, dict[str, np.ndarray]], counts: dict[int, float]
               ) -> dict[int, Node]:
    return {nid: Node(nid, i, updates[nid], counts[nid]) for i, nid in enumerate(updates)}


def client_models(x: dict[str, np.ndarray], seed: int, scale: float = 0.1,
                  extra: dict[str, tuple] | None = None) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for nid in NODES:
        y = {k: (v + scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in x.items()}
        for key, shape in (extra or {}).items():
            y[key] = rng.normal(size=shape).astype(np.float32)
        out[nid] = y
    return out


COUNTS = {101: 10, 102: 40, 103: 25, 104: 100, 105: 7, 106: 60, 107: 33}


def guarded(strategy, **kwargs) -> Guarded:
    """``Guarded(strategy)`` with the strategy's reply layout and per-client records,
    for a Guarded that takes them as arguments (it found them on the strategy before)."""
    import inspect

    params = inspect.signature(Guarded).parameters
    if "reply_layout" in params:
        kwargs.setdefault("reply_layout", getattr(strategy, "reply_array_spec", None))
    if "per_client" in params and hasattr(strategy, "attach_accepted"):
        kwargs.setdefault("per_client", strategy)
    return Guarded(strategy, **kwargs)


def secure_round(strategy, x, nodes, config, s=None, drop=None, spec_fn=None):
    """configure -> SecAgg+ over the loopback grid -> aggregate, as Strategy.start does."""
    loop = LoopbackGrid(nodes, drop)
    guarded_strategy = guarded(strategy, example_limits=ExampleLimits(default=1000))
    grid = SecureAggregationGrid(loop, s or settings(),
                                 reply_spec=spec_fn or array_spec, rng=random.Random(0))
    messages = guarded_strategy.configure_train(
        1, ArrayRecord({k: Array(v) for k, v in x.items()}), config, loop)
    replies = grid.send_and_receive(messages)
    arrays, metrics = guarded_strategy.aggregate_train(1, replies)
    return arrays, metrics, loop, replies


def plain_mean(models: dict[int, dict], counts: dict[int, float], keep: list[int]):
    total = sum(counts[n] for n in keep)
    return {k: sum(counts[n] * models[n][k].astype(np.float64) for n in keep) / total
            for k in models[keep[0]]}


def bound(counts: dict[int, float], keep: list[int], s: SecAggSettings, magnitude: float) -> float:
    """2 c m / sum r_i + |v| m / sum r_i (module docstring), r_i = round(T n_i / W)."""
    r = sum(round(counts[n] / s.max_weight * s.quantization_range) for n in keep)
    m = len(keep)
    return (2 * s.clipping_range * m + magnitude * m) / r


def strategy_config(defaults, **overrides) -> ConfigRecord:
    return ConfigRecord({wire.RUN_CONFIG: run_config_json(defaults, **overrides)})


def fedavg() -> FedAvg:
    return FedAvg(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)


# ------------------------------------------------------------------ equals plain aggregation
def test_fedavg_secure_aggregate_equals_plain_within_the_quantization_bound(defaults):
    x = model(0)
    models = client_models(x, seed=1)
    nodes = make_nodes(models, COUNTS)
    arrays, metrics, _, _ = secure_round(fedavg(), x, nodes, strategy_config(defaults))
    want = plain_mean(models, COUNTS, NODES)
    updates = [np.abs(models[n][k] - x[k]).max() for n in NODES for k in x]
    tol = bound(COUNTS, NODES, settings(), max(updates))
    assert tol < 1e-4  # the bound is tight enough to mean something
    for k in x:
        got = arrays[k].numpy()
        assert got.dtype == np.float32
        err = np.abs(got.astype(np.float64) - want[k]).max()
        assert err <= tol + 1e-6, (k, err, tol)  # + float32 rounding of the result
        assert err > 0  # quantized, not a copy of the plain mean
    assert metrics[wire.REPLIES_VALID] == 7 and metrics[wire.REPLIES_REJECTED] == 0
    assert metrics[SURVIVORS] == 7 and metrics[DROPOUTS] == 0
    assert metrics[wire.ROUND_AGGREGATED] == 1


def test_a_wrong_weighting_would_fail_the_comparison(defaults):
    """The comparison can fail: the uniform mean is far outside the bound."""
    x = model(0)
    models = client_models(x, seed=1)
    arrays, _, _, _ = secure_round(fedavg(), x, make_nodes(models, COUNTS),
                                   strategy_config(defaults))
    uniform = plain_mean(models, {n: 1 for n in NODES}, NODES)
    assert max(np.abs(arrays[k].numpy() - uniform[k]).max() for k in x) > 1e-3


def test_fedadam_secure_aggregate_equals_plain(defaults):
    x = model(0)
    models = client_models(x, seed=2)
    secure, _, _, _ = secure_round(FedAdam(eta=0.05, min_train_nodes=2, min_available_nodes=2),
                                   x, make_nodes(models, COUNTS), strategy_config(defaults))
    # The same Adam step from the exact mean
    plain = FedAdam(eta=0.05, min_train_nodes=2, min_available_nodes=2)
    plain_guarded = guarded(plain)
    loop = LoopbackGrid(make_nodes(models, COUNTS))
    plain_guarded.configure_train(1, ArrayRecord({k: Array(v) for k, v in x.items()}),
                                  strategy_config(defaults), loop)
    from tests.helpers import make_reply
    want, _ = plain_guarded.aggregate_train(1, [make_reply(models[n], COUNTS[n], node_id=n)
                                          for n in NODES])
    for k in x:
        # Adam's step is eta * m / (sqrt(v) + tau): a ~1e-6 change of the mean moves it
        # by at most eta * (1 - beta1) * 1e-6 / tau-ish; bounded well below 1e-4 here.
        assert np.abs(secure[k].numpy() - want[k].numpy()).max() < 1e-4


def test_scaffold_model_and_c_equal_plain_and_only_contributors_are_accepted(defaults):
    x = model(0)
    dc = {DC_PREFIX + k: s for k, s in SHAPES.items()}
    models = client_models(x, seed=3, extra=dc)
    total = 500.0  # n: all clients' training examples (more than the sampled ones)

    def scaffold():
        return Scaffold(num_clients=10, total_examples=total, fraction_train=1.0,
                        min_train_nodes=2, min_available_nodes=2)

    secure = scaffold()
    config = strategy_config(defaults, strategy="scaffold")
    drop = {Stage.COLLECT_MASKED_VECTORS: {104}}
    arrays, metrics, loop, _ = secure_round(secure, x, make_nodes(models, COUNTS), config,
                                            drop=drop, spec_fn=secure.reply_array_spec)
    keep = [n for n in NODES if n != 104]
    # Plain SCAFFOLD on the survivors' replies
    plain = scaffold()
    plain.configure_train(1, ArrayRecord({k: Array(v) for k, v in x.items()}),
                          strategy_config(defaults, strategy="scaffold"), loop)
    from tests.helpers import make_reply
    want, _ = plain.aggregate_train(1, [make_reply(models[n], COUNTS[n], node_id=n)
                                        for n in keep])
    tol = bound(COUNTS, keep, settings(), 5.0)
    for k in x:
        assert np.abs(arrays[k].numpy() - want[k].numpy()).max() <= tol + 1e-6
        # c = sum_S n_i dc_i / n: within the bound scaled by sum_S n_i / n
        assert np.abs(secure.c[k] - plain.c[k]).max() <= tol + 1e-6
        assert np.abs(plain.c[k]).max() > 1e-2  # c moved: the test compares something
    assert secure.accepted == {n: 1 for n in keep}  # 104 dropped: its c_i+ must not commit
    assert metrics[wire.REPLIES_VALID] == 6 and metrics[wire.REPLIES_REJECTED] == 1


# ------------------------------------------------------------------ what the server sees
def test_the_server_receives_only_masked_vectors(defaults):
    x = model(0)
    models = client_models(x, seed=4)
    _, _, loop, replies = secure_round(fedavg(), x, make_nodes(models, COUNTS),
                                       strategy_config(defaults))
    collected = [r for stage, r in loop.received if stage == Stage.COLLECT_MASKED_VECTORS]
    assert len(collected) == len(NODES)
    s = settings()
    for reply in collected:
        # no array data at all, in any record
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
        from flwr.common import bytes_to_ndarray
        vector = np.concatenate([bytes_to_ndarray(b).ravel() for b in
                                 reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]])
        # Unmasked, every quantized value is < T = 2^22; masked, they are uniform mod 2^32.
        # (P(3 or more of 36 uniform values below 2T) ~ 5e-5.)
        assert np.count_nonzero(vector < 2 * s.quantization_range) <= 2
    # and what reaches the strategy is one reply, the aggregate
    assert len(replies) == 1 and SECAGG_RECORD in replies[0].content.config_records


# ------------------------------------------------------------------ dropouts
@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.SHARE_KEYS,
                                   Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK])
def test_dropouts_within_tolerance_still_give_the_survivors_mean(defaults, stage):
    x = model(0)
    models = client_models(x, seed=5)
    dropped = {102, 106}  # 2 = num_shares - threshold
    arrays, metrics, _, _ = secure_round(fedavg(), x, make_nodes(models, COUNTS),
                                         strategy_config(defaults), drop={stage: dropped})
    # A node that dropped in the unmask stage already uploaded: its update is in the sum.
    keep = NODES if stage == Stage.UNMASK else [n for n in NODES if n not in dropped]
    want = plain_mean(models, COUNTS, keep)
    tol = bound(COUNTS, keep, settings(), 1.0)
    for k in x:
        assert np.abs(arrays[k].numpy() - want[k]).max() <= tol + 1e-6
    assert metrics[SURVIVORS] == len(keep)


@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.SHARE_KEYS,
                                   Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK])
def test_too_many_dropouts_fail_the_round_cleanly(defaults, stage):
    x = model(0)
    models = client_models(x, seed=6)
    dropped = {101, 102, 103, 104, 105}  # leaves 2 < threshold 3
    arrays, metrics, _, replies = secure_round(fedavg(), x, make_nodes(models, COUNTS),
                                               strategy_config(defaults), drop={stage: dropped})
    assert arrays is None  # the global model stays as it was
    assert metrics[wire.ROUND_AGGREGATED] == 0
    assert metrics[wire.REPLIES_VALID] == 0 and metrics[wire.REPLIES_REJECTED] == 7
    assert replies[0].has_error() and "secure aggregation failed" in replies[0].error.reason
    assert metrics["secagg-failed"] == 1


def test_a_client_over_max_weight_refuses_and_counts_as_dropped(defaults):
    x = model(0)
    models = client_models(x, seed=7)
    counts = {**COUNTS, 104: 150}  # above max_weight = 100
    nodes = make_nodes(models, counts)
    arrays, metrics, loop, _ = secure_round(fedavg(), x, nodes, strategy_config(defaults))
    keep = [n for n in NODES if n != 104]
    want = plain_mean(models, counts, keep)
    for k in x:
        assert np.abs(arrays[k].numpy() - want[k]).max() <= bound(counts, keep, settings(), 1.0) + 1e-6
    assert metrics[DROPOUTS] == 1
    errors = [r for stage, r in loop.received if r.has_error()]
    assert len(errors) == 1 and "secagg-max-weight" in errors[0].error.reason


def test_a_non_finite_update_is_never_uploaded(defaults):
    x = model(0)
    models = client_models(x, seed=8)
    models[103]["w"][0, 0] = np.nan
    arrays, metrics, _, _ = secure_round(fedavg(), x, make_nodes(models, COUNTS),
                                         strategy_config(defaults))
    assert np.all(np.isfinite(arrays["w"].numpy()))
    assert metrics[SURVIVORS] == 6


def test_clipping_is_counted_not_silent(defaults):
    x = model(0)
    models = client_models(x, seed=9)
    models[104]["b"] = x["b"] + 20.0  # weighted: 20 * 100/100 > clipping range 8
    _, metrics, _, _ = secure_round(fedavg(), x, make_nodes(models, COUNTS),
                                    strategy_config(defaults))
    # the number of clients that clipped a value, summed inside the protocol (a per-client
    # count would be plaintext)
    assert metrics["secagg-clipped"] == 1


# ------------------------------------------------------------------ pure parts
def test_upload_is_the_update_for_model_keys_and_raw_for_others():
    sent = {"a": np.array([1.0, 2.0]), "b": np.array([3.0])}
    reply = {"b": np.array([5.0]), "a": np.array([1.5, 1.0]), "z": np.array([7.0])}
    out = upload_arrays(sent, reply)
    assert [o.tolist() for o in out] == [[0.5, -1.0], [2.0], [7.0]]  # sorted: a, b, z
    assert clipped_count([np.array([1.0, -9.0, 20.0])], 50, 100, 8.0) == 1  # only 20 * 0.5


def test_neighbourhoods_are_rings_of_num_shares():
    graph = neighbourhoods(range(9), 5, random.Random(1))
    assert all(len(g) == 5 and n in g for n, g in graph.items())
    assert all(n in graph[m] for n, g in graph.items() for m in g)  # symmetric


@pytest.mark.parametrize("overrides, fragment", [
    ({"num_shares": 4}, "odd integer"),
    ({"num_shares": 5, "threshold": 5}, "must be below"),
    ({"threshold": 1}, ">= 2"),
    ({"clipping_range": 0.0}, "clipping-range"),
    ({"quantization_range": 2**33}, "quantization-range"),
    ({"max_weight": -1.0}, "max-weight"),
])
def test_bad_settings_are_named(overrides, fragment):
    problems = settings_problems(settings(**overrides))
    assert problems and fragment in problems[0]
    with pytest.raises(ValueError, match=fragment.split()[0]):
        settings(**overrides).check()


def test_sampled_count_checks():
    with pytest.raises(ValueError, match="exceeds the 4 clients sampled"):
        settings().check_sampled(4)
    with pytest.raises(ValueError, match="overflow"):
        settings(num_shares=3, threshold=2, quantization_range=2**30).check_sampled(5)
    settings().check_sampled(5)


@pytest.mark.parametrize("overrides, fragment", [
    ({"secagg": True, "strategy": "krum", "num-malicious": 0, "min-train-nodes": 3},
     "individual update"),
    ({"secagg": True, "strategy": "fedmedian"}, "individual update"),
    ({"secagg": True, "strategy": "scaffold", "scaffold-weighting": "uniform"}, "num-examples"),
    ({"secagg": True, "dp": True, "dp-mode": "user"}, "dp-mode"),
    ({"secagg": True, "attack": "sign-flip", "num-attackers": 1}, "attack"),
    ({"secagg": True, "secagg-num-shares": 6}, "odd"),
    ({"secagg": True, "secagg-reconstruction-threshold": 5}, "below"),
    ({"secagg": True, "secagg-max-weight": 0}, "secagg-max-weight"),
    ({"secagg-num-shares": 7}, "only take effect with secagg = true"),
])
def test_run_config_refuses_what_secagg_cannot_serve(make_config, overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        make_config(**overrides)


def test_run_config_accepts_every_sum_based_strategy(make_config):
    for name in ("fedavg", "fedprox", "fedadam", "fedavgm", "fedyogi", "fedadagrad", "scaffold"):
        assert make_config(secagg=True, strategy=name).secagg


@pytest.mark.parametrize("sampled, expected", [(3, (3, 2)), (4, (3, 2)), (5, (5, 3)), (6, (5, 3)),
                                               (50, (5, 3)), (None, (5, 3))])
def test_auto_shares_fit_the_clients_sampled_within_the_security_rule(sampled, expected):
    """The defaults ("auto") follow the round: the largest odd neighbourhood <= min(5,
    sampled) and the fewest shares above half of it, so the guide's 3-node SecAgg+ run
    works without settings; explicit values are kept."""
    from strategies.secagg import auto_shares, threshold_problem

    shares, threshold = auto_shares("auto", "auto", sampled)
    assert (shares, threshold) == expected
    assert threshold_problem(shares, threshold) is None and threshold < shares
    assert auto_shares(7, 4, sampled) == (7, 4)


def test_a_round_of_two_clients_is_refused_with_advice_that_can_be_followed(make_config):
    from fl_app.server_app import secagg_settings

    cfg = make_config(secagg=True, **{"min-train-nodes": 2})
    with pytest.raises(ValueError, match="needs at least 3 clients sampled per round") as err:
        secagg_settings(cfg, [100, 100], 2)
    assert "odd number <= 2" not in str(err.value)
    settings = secagg_settings(make_config(secagg=True, **{"min-train-nodes": 3}), [100] * 3, 3)
    assert (settings.num_shares, settings.threshold) == (3, 2)
