"""Guarded: bad replies are left out (with reasons), the model never goes non-finite,
too few valid replies leave it unchanged, and sampling is reproducible in partition space."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp.strategy import FedAdam as FlowerFedAdam
from flwr.serverapp.strategy import FedAvg, FedAvgM, Strategy

import strategies
from strategies.fedadam import FedAdam
from strategies.guard import ExampleLimits, Guarded
from strategies.sampling import PartitionSampler
from strategies.validation import array_spec, check_reply, record_nbytes, split_replies
from tests.helpers import make_grid, make_reply

W = {"w": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([0.5], dtype=np.float32)}


def global_arrays() -> ArrayRecord:
    return ArrayRecord({k: Array(v.copy()) for k, v in W.items()})


def arrays(w, b) -> dict:
    return {"w": np.asarray(w, dtype=np.float32), "b": np.asarray(b, dtype=np.float32)}


BAD_REPLIES = {
    "extra key": (dict(arrays=arrays([1, 1], [1]) | {"extra": np.zeros(1, np.float32)}), "array keys differ"),
    "dropped key": (dict(arrays={"w": np.zeros(2, np.float32)}), "array keys differ"),
    "wrong shape": (dict(arrays=arrays([1, 1, 1], [1])), "has shape (3,)"),
    "wrong dtype": (dict(arrays={"w": np.zeros(2, np.float64), "b": np.zeros(1, np.float32)}), "dtype float64"),
    "nan": (dict(arrays=arrays([np.nan, 1], [1])), "NaN or Inf"),
    "inf": (dict(arrays=arrays([1, 1], [np.inf])), "NaN or Inf"),
    "zero examples": (dict(arrays=arrays([1, 1], [1]), num_examples=0), "must be a finite number > 0"),
    "negative examples": (dict(arrays=arrays([1, 1], [1]), num_examples=-5), "must be a finite number > 0"),
    "no num-examples": (dict(arrays=arrays([1, 1], [1]), num_examples=None), "'num-examples' is missing"),
    "nan metric": (dict(arrays=arrays([1, 1], [1]), extra_metrics={"train-loss": float("nan")}), "'train-loss' is not finite"),
    "no arrays": (dict(arrays=None), "exactly one ArrayRecord"),
    "client error": (dict(arrays=None, error="boom"), "client error: boom"),
}


@pytest.mark.parametrize("name", sorted(BAD_REPLIES))
def test_each_bad_reply_is_rejected_with_its_reason(name):
    kwargs, reason = BAD_REPLIES[name]
    good = make_reply(arrays([1, 1], [1]), node_id=1)
    bad = make_reply(**kwargs, node_id=2)
    valid, rejected = split_replies([good, bad], array_spec(global_arrays()))
    assert valid == [good]
    assert len(rejected) == 1 and reason in rejected[0][1]


def test_evaluate_replies_need_no_arrays():
    assert check_reply(make_reply(None, num_examples=4).content, None) is None


def guarded_fedavg(min_valid=1, sampler=None) -> Guarded:
    return Guarded(FedAvg(min_train_nodes=1, min_available_nodes=1), sampler=sampler,
                   min_valid_replies=min_valid)


def configure(strategy: Guarded, nodes=(11, 12, 13)) -> list:
    return list(strategy.configure_train(1, global_arrays(), ConfigRecord(), make_grid(list(nodes))))


def test_aggregate_is_fedavg_of_the_valid_replies_only():
    """Hand-computed: weighted mean of (1,1|1) x10 and (4,7|-2) x20 = (3,5|-1)."""
    # Prepare
    strategy = guarded_fedavg()
    configure(strategy)
    replies = [
        make_reply(arrays([1, 1], [1]), num_examples=10, node_id=11),
        make_reply(arrays([4, 7], [-2]), num_examples=20, node_id=12),
        make_reply(arrays([np.nan, 1e9], [1]), num_examples=1000, node_id=13),
    ]
    # Execute
    agg, metrics = strategy.aggregate_train(1, replies)
    # Assert
    np.testing.assert_allclose(agg["w"].numpy(), [3.0, 5.0], rtol=1e-6)
    np.testing.assert_allclose(agg["b"].numpy(), [-1.0], rtol=1e-6)
    assert metrics["replies-valid"] == 2 and metrics["replies-rejected"] == 1
    wire_bytes = record_nbytes(global_arrays())  # 12 bytes of float32 plus .npy headers
    assert wire_bytes > 12
    assert metrics["upload-bytes-per-client"] == wire_bytes
    assert metrics["download-bytes-per-client"] == wire_bytes


def test_too_few_valid_replies_leave_the_model_unchanged():
    strategy = guarded_fedavg(min_valid=2)
    configure(strategy)
    replies = [make_reply(arrays([1, 1], [1]), node_id=11),
               make_reply(arrays([1, 1], [1]), num_examples=0, node_id=12)]
    agg, metrics = strategy.aggregate_train(1, replies)
    assert agg is None
    assert metrics["replies-valid"] == 1 and metrics["replies-rejected"] == 1


def test_all_replies_failed_leaves_the_model_unchanged():
    strategy = guarded_fedavg()
    configure(strategy)
    agg, metrics = strategy.aggregate_train(1, [make_reply(None, error="timeout", node_id=11)])
    assert agg is None and metrics["replies-rejected"] == 1


class _Exploding(FedAvg):
    """A stand-in for a server optimizer that overflows: state changes, output is NaN."""

    def __init__(self):
        super().__init__(min_train_nodes=1, min_available_nodes=1)
        self.state = 0

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.state += 1
        return ArrayRecord({k: Array(np.full_like(v.numpy(), np.nan)) for k, v in arrays.items()}), metrics


def test_non_finite_aggregate_is_discarded_and_strategy_state_rolled_back():
    inner = _Exploding()
    strategy = Guarded(inner)
    configure(strategy)
    agg, _ = strategy.aggregate_train(1, [make_reply(arrays([1, 1], [1]), node_id=11)])
    assert agg is None
    assert inner.state == 0


def test_server_momentum_state_is_kept_when_round_is_valid():
    """FedAvgM (lr 1, momentum 0.5): Δ = x - mean = (1,2|.5) - (0,0|0) -> x' = x - Δ."""
    strategy = Guarded(FedAvgM(min_train_nodes=1, min_available_nodes=1,
                               server_learning_rate=1.0, server_momentum=0.5))
    configure(strategy)
    agg, _ = strategy.aggregate_train(1, [make_reply(arrays([0, 0], [0]), node_id=11)])
    np.testing.assert_allclose(agg["w"].numpy(), [0.0, 0.0], atol=1e-6)
    assert strategy.inner.momentum_vector is not None


# ----------------------------------------------------------------- sampling
def sampler_for(mapping: dict[int, int], seed: int) -> PartitionSampler:
    return PartitionSampler(seed, lambda nodes: {n: mapping[n] for n in nodes})


def test_same_seed_samples_same_partitions_whatever_the_node_ids():
    # Two "runs" whose nodes hold the same partitions under different node ids.
    run_a = {101: 0, 205: 1, 377: 2, 412: 3, 999: 4}
    run_b = {7: 3, 8: 0, 9: 4, 10: 1, 11: 2}
    for server_round in (1, 2, 3):
        a = sampler_for(run_a, seed=5).choose(run_a, 2, server_round, "train")
        b = sampler_for(run_b, seed=5).choose(run_b, 2, server_round, "train")
        assert sorted(run_a[n] for n in a) == sorted(run_b[n] for n in b)


def test_other_seed_or_round_samples_other_partitions():
    mapping = {n: n for n in range(20)}
    picks = {tuple(sampler_for(mapping, seed).choose(mapping, 5, r, "train"))
             for seed in (0, 1) for r in (1, 2, 3)}
    assert len(picks) == 6
    chosen = sampler_for(mapping, 0).choose(mapping, 5, 1, "train")
    assert len(set(chosen)) == 5


def test_guarded_readdresses_messages_to_the_sampled_nodes():
    mapping = {31: 2, 32: 0, 33: 1, 34: 3}
    sampler = sampler_for(mapping, seed=0)
    inner = FedAvg(fraction_train=0.5, min_train_nodes=1, min_available_nodes=1)
    strategy = Guarded(inner, sampler=sampler)
    messages = configure(strategy, nodes=mapping)
    expected = sampler_for(mapping, seed=0).choose(list(mapping), 2, 1, "train")
    assert [m.metadata.dst_node_id for m in messages] == expected


class _NeverCalled(Strategy):
    def configure_train(self, *a): raise AssertionError
    def aggregate_train(self, *a): raise AssertionError
    def configure_evaluate(self, *a): raise AssertionError
    def aggregate_evaluate(self, *a): raise AssertionError
    def summary(self): pass


def test_inner_strategy_is_not_called_without_enough_valid_replies():
    strategy = Guarded(_NeverCalled(), min_valid_replies=1)
    strategy._expected_spec = array_spec(global_arrays())
    strategy._global_spec = strategy._expected_spec
    agg, metrics = strategy.aggregate_train(1, [make_reply(arrays([np.nan, 0], [0]))])
    assert agg is None and isinstance(metrics, MetricRecord)


# ----------------------------------------------------------------- num-examples bounds
def test_a_reply_claiming_too_many_examples_is_rejected():
    """Unbounded, one claim of 1e12 examples would make the mean that client's weights."""
    strategy = Guarded(FedAvg(min_train_nodes=1, min_available_nodes=1),
                       example_limits=ExampleLimits(default=1000))
    configure(strategy)
    replies = [make_reply(arrays([1, 1], [1]), num_examples=10, node_id=11),
               make_reply(arrays([9, 9], [9]), num_examples=1e12, node_id=12)]
    agg, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(agg["w"].numpy(), [1.0, 1.0])
    assert metrics["replies-rejected"] == 1


def test_huge_claims_cannot_overflow_the_weight_sum():
    """Two claims of 1e308 overflow sum(n_i) to Inf: FedAvg would return all zeros (finite,
    so it passes every other check). Both are rejected and the model stays as it was."""
    strategy = guarded_fedavg()
    configure(strategy)
    replies = [make_reply(arrays([3, 3], [3]), num_examples=1e308, node_id=n) for n in (11, 12)]
    agg, metrics = strategy.aggregate_train(1, replies)
    assert agg is None and metrics["replies-rejected"] == 2 and metrics["round-aggregated"] == 0


def test_in_simulation_the_bound_is_the_partition_training_size():
    """Partition 0 trains on 50 samples, partition 1 on 80: 60 is fine from 1, not from 0."""
    mapping = {11: 0, 12: 1}
    strategy = Guarded(FedAvg(min_train_nodes=1, min_available_nodes=1),
                       sampler=sampler_for(mapping, 0),
                       example_limits=ExampleLimits(default=10**6, train={0: 50, 1: 80}))
    configure(strategy, nodes=mapping)
    replies = [make_reply(arrays([1, 1], [1]), num_examples=60, node_id=11),
               make_reply(arrays([2, 2], [2]), num_examples=60, node_id=12)]
    agg, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(agg["w"].numpy(), [2.0, 2.0])
    assert metrics["replies-rejected"] == 1


# ----------------------------------------------------------------- strategy state
def test_non_finite_strategy_state_rolls_the_round_back():
    """One reply of weights 1e20 (float32): Delta^2 overflows, v = Inf while x stays finite.
    Unguarded, FedAdam's steps would be m / (sqrt(Inf) + tau) = 0 for the rest of the run."""
    inner = FedAdam(eta=0.1, min_train_nodes=1, min_available_nodes=1)
    strategy = Guarded(inner)
    configure(strategy)
    strategy.aggregate_train(1, [make_reply(arrays([2, 3], [1]), node_id=11)])
    m_before, v_before = (copy_state(inner.m), copy_state(inner.v))
    configure(strategy)
    agg, metrics = strategy.aggregate_train(2, [make_reply(arrays([1e20, 1], [1]), node_id=11)])
    assert agg is None and metrics["round-aggregated"] == 0
    for key in m_before:
        np.testing.assert_array_equal(inner.m[key], m_before[key])
        np.testing.assert_array_equal(inner.v[key], v_before[key])
    configure(strategy)  # and the next ordinary round moves the model again
    agg, _ = strategy.aggregate_train(3, [make_reply(arrays([2, 3], [1]), node_id=11)])
    assert agg is not None and not np.allclose(agg["w"].numpy(), W["w"])


def copy_state(d):
    return {k: v.copy() for k, v in d.items()}


def test_flower_fedadam_float64_aggregate_is_cast_not_discarded():
    """Flower's FedAdam returns float64 arrays for a float32 model; the guard casts them."""
    inner = FlowerFedAdam(eta=0.1, min_train_nodes=1, min_available_nodes=1)
    raw = FlowerFedAdam(eta=0.1, min_train_nodes=1, min_available_nodes=1)
    strategy = Guarded(inner)
    configure(strategy)
    list(raw.configure_train(1, global_arrays(), ConfigRecord(), make_grid([11])))
    reply = make_reply(arrays([2, 3], [1]), node_id=11)
    agg, metrics = strategy.aggregate_train(1, [reply])
    want, _ = raw.aggregate_train(1, [reply])
    assert want["w"].numpy().dtype == np.float64  # the reason for the cast
    assert agg is not None and metrics["round-aggregated"] == 1
    assert agg["w"].numpy().dtype == np.float32
    np.testing.assert_allclose(agg["w"].numpy(), want["w"].numpy().astype(np.float32))


# ----------------------------------------------------------------- nodes that never answered
def test_nodes_that_never_said_their_partition_are_not_sampled_nor_asked_twice_a_round():
    asked = []
    mapping = {21: 0, 22: 1, 23: 2}  # node 24 never answers

    def discover(nodes):
        asked.append(sorted(nodes))
        return {n: mapping[n] for n in nodes if n in mapping}

    sampler = PartitionSampler(0, discover)
    nodes = [21, 22, 23, 24]
    for stage in ("train", "evaluate"):
        chosen = sampler.choose(nodes, 4, 1, stage)
        assert 24 not in chosen and sorted(chosen) == [21, 22, 23]
    assert asked == [[21, 22, 23, 24]]  # round 1: asked once, for train and evaluate
    sampler.choose(nodes, 2, 2, "train")
    sampler.choose(nodes, 2, 2, "evaluate")
    assert asked == [[21, 22, 23, 24], [24]]  # round 2: only the silent node, once


def test_guard_sends_fewer_messages_when_nodes_are_unknown():
    mapping = {31: 0, 32: 1}
    sampler = PartitionSampler(0, lambda nodes: {n: mapping[n] for n in nodes if n in mapping})
    strategy = Guarded(FedAvg(min_train_nodes=1, min_available_nodes=1), sampler=sampler)
    messages = configure(strategy, nodes=(31, 32, 33, 34))
    assert sorted(m.metadata.dst_node_id for m in messages) == [31, 32]


def test_two_nodes_claiming_one_partition_the_first_keeps_it_until_it_leaves(caplog):
    """A second SuperNode started with a partition-id already held is left out (warned,
    once) while the holder is connected; a restarted SuperNode (new node id) takes over
    its partition once the old id is gone."""
    mapping = {41: 0, 42: 1, 43: 1, 44: 2}
    sampler = sampler_for(mapping, seed=0)
    with caplog.at_level("WARNING"):
        for server_round in (1, 2):
            chosen = sampler.choose([41, 42, 43, 44], 4, server_round, "train")
            assert chosen == [41, 42, 44]
    warnings = [r.getMessage() for r in caplog.records if "claims partition-id" in r.getMessage()]
    assert warnings == ["Node 43 claims partition-id 1, already held by node 42: left out while "
                        "that node is connected (give each SuperNode its own partition-id)"]
    assert sampler.choose([41, 43, 44], 3, 3, "train") == [41, 43, 44]  # 42 disconnected


def _lying_array(announced_shape, data_values) -> Array:
    """An Array whose dtype/shape fields announce one layout while its .npy data hold
    another (the fields and the data are separate fields on the wire)."""
    honest = Array(np.asarray(data_values, dtype=np.float32))
    return Array(dtype="float32", shape=tuple(announced_shape), stype=honest.stype,
                 data=honest.data)


@pytest.mark.parametrize("values", [
    np.arange(6, dtype=np.float32).reshape(2, 3),
    np.linspace(-1, 1, 7),                               # float64
    np.arange(5, dtype=np.int64),
    np.array(3.5, dtype=np.float32),                     # 0-d
    np.zeros((0, 4), dtype=np.float32),                  # empty
    np.asfortranarray(np.arange(6.0).reshape(2, 3)),     # written Fortran-ordered
    np.arange(4, dtype=">f4"),                           # big-endian
    np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]),     # structured
])
def test_array_values_equal_flowers_own_parse(values):
    from strategies.validation import array_values

    array = Array(values)
    got = array_values(array)
    expected = array.numpy()
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_an_array_whose_fields_disagree_with_its_data_is_rejected():
    """Flower's Array.numpy() returns whatever the data hold: a (1,) array announced as
    (2,) passed the shape check and would broadcast into every weight of the mean."""
    from strategies.validation import array_values

    with pytest.raises(ValueError, match=r"data hold float32 \(1,\), its fields say float32 \(2,\)"):
        array_values(_lying_array((2,), [1e6]))
    strategy = guarded_fedavg()
    configure(strategy)
    good = make_reply(arrays([1, 1], [1]), num_examples=10, node_id=11)
    bad = make_reply(arrays([1, 1], [1]), num_examples=10, node_id=12)
    bad.content["arrays"]["w"] = _lying_array((2,), [1e6])
    valid, rejected = split_replies([good, bad], array_spec(global_arrays()))
    assert valid == [good] and "array 'w' is inconsistent" in rejected[0][1]
    aggregate, _ = strategy.aggregate_train(1, [good, bad])
    np.testing.assert_array_equal(aggregate["w"].numpy(), [1, 1])


def test_scaffold_under_the_seeded_sampler_gets_each_final_nodes_accepted_entry():
    """SCAFFOLD gives each client its own accepted entry; under Guarded the entries are
    attached after the seeded sampler has re-addressed the messages (attached before,
    the per-node content stopped the re-addressing and Flower's random sampling chose
    the clients, which broke the seeded, resumable sampling)."""
    from strategies.scaffold import ACCEPTED_RECORD, C_RECORD, Scaffold

    mapping = {31: 2, 32: 0, 33: 1, 34: 3}
    inner = Scaffold(num_clients=4, weighting="uniform", fraction_train=0.5, min_train_nodes=1,
                     min_available_nodes=1, member_of=mapping.get)
    inner.accepted = {2: 1, 0: 1}  # partitions 2 and 0 counted in round 1
    strategy = strategies.guarded("scaffold", inner, sampler=sampler_for(mapping, seed=0))
    messages = list(strategy.configure_train(2, global_arrays(), ConfigRecord(),
                                             make_grid(list(mapping))))
    expected = sampler_for(mapping, seed=0).choose(list(mapping), 2, 2, "train")
    assert [m.metadata.dst_node_id for m in messages] == expected
    for message in messages:
        member = mapping[message.metadata.dst_node_id]
        own = {str(member): 1} if member in inner.accepted else {}
        assert dict(message.content[ACCEPTED_RECORD]) == own
        assert C_RECORD in message.content


# ---------------------------------------------------------------- the round loop, start()
class ArithmeticGrid:
    """Three nodes that answer in process with replies computed from what they received.

    Train: node k sends y_k = A x + B[k] (elementwise), weighted by N[k] examples; so one
    round of FedAvg maps x to A x + sum_k N[k] B[k] / sum_k N[k] = A x + BBAR.
    Evaluate: node k reports val-loss = mean(w) + k on the model it received.
    ``log``: (message type, server-round of the config, node) of every message."""

    A = 0.5
    B = {1: 1.0, 2: 2.0, 3: 4.0}
    N = {1: 10, 2: 20, 3: 30}
    BBAR = (10 * 1.0 + 20 * 2.0 + 30 * 4.0) / 60  # = 17/6

    def __init__(self) -> None:
        self.log: list[tuple[str, int, int]] = []

    def get_node_ids(self):
        return [1, 2, 3]

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Message, RecordDict

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.log.append((msg.metadata.message_type,
                             int(msg.content["config"]["server-round"]), node))
            x = {k: a.numpy() for k, a in msg.content["arrays"].items()}
            if msg.metadata.message_type == "train":
                content = RecordDict({
                    "arrays": ArrayRecord({k: Array((self.A * v + self.B[node]).astype(v.dtype))
                                           for k, v in x.items()}),
                    "metrics": MetricRecord({"num-examples": self.N[node], "train-loss": float(node)}),
                })
            else:
                content = RecordDict({"metrics": MetricRecord({
                    "num-examples": self.N[node], "val-loss": float(x["w"].mean()) + node})})
            replies.append(Message(content, reply_to=msg))
        return replies


def fedavg_after(rounds: int) -> dict[str, np.ndarray]:
    """W after ``rounds`` rounds of x <- A x + BBAR, by hand: w = (1, 2) gives
    (3.3333, 3.8333), (4.5, 4.75), (5.0833, 5.2083); b = 0.5 gives 3.0833, 4.375, 5.0208."""
    x = {k: v.astype(np.float64) for k, v in W.items()}
    for _ in range(rounds):
        x = {k: ArithmeticGrid.A * v + ArithmeticGrid.BBAR for k, v in x.items()}
    return x


def start_run(first_round: int = 1, initial=None):
    grid = ArithmeticGrid()
    guard = Guarded(FedAvg(min_train_nodes=3, min_available_nodes=3, min_evaluate_nodes=3),
                    min_valid_replies=3)
    seen = []

    def evaluate_fn(server_round, arrays):
        seen.append((server_round, {k: a.numpy().copy() for k, a in arrays.items()}))
        return MetricRecord({"mean-w": float(arrays["w"].numpy().mean())})

    result = guard.start(grid, initial if initial is not None else global_arrays(), num_rounds=3,
                         timeout=10.0, train_config=ConfigRecord(), evaluate_config=ConfigRecord(),
                         evaluate_fn=evaluate_fn, first_round=first_round)
    return result, seen, grid


def test_start_runs_three_rounds_of_fedavg_and_evaluates_each_model():
    result, seen, grid = start_run()
    np.testing.assert_allclose(fedavg_after(3)["w"], [5.0833333, 5.2083333], rtol=1e-6)
    for key in W:
        np.testing.assert_allclose(result.arrays[key].numpy(), fedavg_after(3)[key], rtol=1e-6)
        assert result.arrays[key].numpy().dtype == W[key].dtype
    # evaluate_fn: the initial model (round 0), then each round's aggregate
    assert [r for r, _ in seen] == [0, 1, 2, 3]
    for server_round, arrays in seen:
        for key in W:
            np.testing.assert_allclose(arrays[key], fedavg_after(server_round)[key], rtol=1e-6)
    assert sorted(result.evaluate_metrics_serverapp) == [0, 1, 2, 3]
    assert result.evaluate_metrics_serverapp[3]["mean-w"] == pytest.approx(
        fedavg_after(3)["w"].mean(), rel=1e-6)
    # per round: train to all three nodes, then evaluate the new model on all three
    assert [(t, r) for t, r, _ in grid.log] == [(t, r) for r in (1, 2, 3) for t in
                                               ("train",) * 3 + ("evaluate",) * 3]
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    train = result.train_metrics_clientapp[2]
    assert train["train-loss"] == pytest.approx((10 * 1 + 20 * 2 + 30 * 3) / 60)
    assert train["replies-valid"] == 3 and train["round-aggregated"] == 1
    # federated evaluation of round r's model: weighted mean of mean(w) + k
    for server_round in (1, 2, 3):
        val = result.evaluate_metrics_clientapp[server_round]["val-loss"]
        assert val == pytest.approx(fedavg_after(server_round)["w"].mean() + 140 / 60, rel=1e-6)


def test_start_from_round_2_runs_exactly_rounds_2_and_3():
    """A resumed run: the model after round 1 in, rounds 2 and 3 out, the same final model
    as the uninterrupted run, and no second evaluation of round 0 or 1."""
    after_1 = ArrayRecord({k: Array(v.astype(np.float32)) for k, v in fedavg_after(1).items()})
    result, seen, grid = start_run(first_round=2, initial=after_1)
    assert sorted({r for _, r, _ in grid.log}) == [2, 3]
    assert [r for r, _ in seen] == [2, 3]
    for server_round, arrays in seen:
        for key in W:
            np.testing.assert_allclose(arrays[key], fedavg_after(server_round)[key], rtol=1e-6)
    for key in W:
        np.testing.assert_allclose(result.arrays[key].numpy(), fedavg_after(3)[key], rtol=1e-6)
    assert sorted(result.train_metrics_clientapp) == [2, 3]
    assert sorted(result.evaluate_metrics_clientapp) == [2, 3]
    assert sorted(result.evaluate_metrics_serverapp) == [2, 3]
