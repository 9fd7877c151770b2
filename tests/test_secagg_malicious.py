"""SecAgg+ against malicious participants (strategies/secagg.py, fl_app/secagg_client.py).

The protocol runs in-process as in ``tests/test_secagg.py`` (Flower's real
``secaggplus_mod`` behind ``secagg_gate`` on every node, every message serialized and
parsed again), through a grid that can tamper with one node's reply (a malicious
client) or rewrite the server's requests before delivery (a lying server).

For the aggregate checks every node's update is the same constant u_k on every
coordinate, so the expected weighted mean is a number computed by hand in the test.
"""

from __future__ import annotations

import logging
import math
import os
import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fl_common import wire
from strategies.guard import ExampleLimits, Guarded
from strategies.secagg import (
    DROPOUTS,
    SECAGG_RECORD,
    SURVIVORS,
    SecureAggregationGrid,
    neighbourhoods,
    settings_problems,
)
from strategies.validation import array_spec
from tests.helpers import LoopbackGrid, Node, wire_roundtrip
from tests.test_secagg import COUNTS, NODES, fedavg, model, settings, strategy_config

MALFORMED = "secagg-malformed"  # strategies.secagg.MALFORMED (metric: nodes refused)
MALFORMED_NODES = "malformed"  # strategies.secagg's SECAGG_RECORD entry naming them
# Node k's update is UPDATES[k] on every coordinate (counts: tests.test_secagg.COUNTS =
# 101: 10, 102: 40, 103: 25, 104: 100, 105: 7, 106: 60, 107: 33).
UPDATES = {101: 0.01, 102: 0.02, 103: 0.03, 104: 0.04, 105: 0.05, 106: 0.06, 107: 0.07}
# Without 103: (10*.01 + 40*.02 + 100*.04 + 7*.05 + 60*.06 + 33*.07) / 250 = 11.16 / 250
MEAN_WITHOUT_103 = 11.16 / 250
# All seven: (11.16 + 25*.03) / 275 = 11.91 / 275
MEAN_OF_ALL = 11.91 / 275
TAMPERED = 103


class MetricNode(Node):
    """A client whose handler also returns the app's training metrics."""

    def __init__(self, *args, metrics: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = metrics if metrics is not None else {
            wire.TRAIN_LOSS: 0.5, wire.TRAIN_ACCURACY: 0.8, wire.LOCAL_SECONDS: 1.25,
            wire.LOCAL_STEPS: 17}

    def handler(self, msg: Message, context) -> Message:
        self.trained += 1
        return Message(RecordDict({
            wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in self.arrays.items()}),
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: self.num_examples, **self.metrics}),
        }), reply_to=msg)


class TamperingGrid(LoopbackGrid):
    """``LoopbackGrid`` with hooks: ``tamper[(stage, node)](reply)`` rewrites that node's
    reply (a malicious client); ``lie[(stage, node)](request)`` rewrites the server's
    request to that node before delivery (a lying server). ``delivered`` keeps the
    replies as the server receives them, by (stage, node)."""

    def __init__(self, nodes, tamper=None, lie=None, drop=None) -> None:
        super().__init__(nodes, drop)
        self.tamper = tamper or {}
        self.lie = lie or {}
        self.delivered: dict[tuple[str, int], Message] = {}

    def send_and_receive(self, messages, *, timeout=None):
        messages = [wire_roundtrip(m) for m in messages]
        stage = messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
        for msg in messages:
            if (stage, msg.metadata.dst_node_id) in self.lie:
                self.lie[(stage, msg.metadata.dst_node_id)](msg)
        out = []
        for reply in super().send_and_receive(messages, timeout=timeout):
            nid = reply.metadata.src_node_id
            if (stage, nid) in self.tamper and not reply.has_error():
                self.tamper[(stage, nid)](reply)
                reply = wire_roundtrip(reply)
            self.delivered[(stage, nid)] = reply
            out.append(reply)
        return out


def constant_models(x: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    return {n: {k: (v.astype(np.float64) + UPDATES[n]).astype(np.float32) for k, v in x.items()}
            for n in NODES}


def run_round(x, tamper=None, lie=None, s=None, drop=None, node_metrics=None, defaults=None,
              nodes=None):
    """configure -> SecAgg+ through a TamperingGrid -> aggregate, as Strategy.start does."""
    models = constant_models(x)
    if nodes is None:
        nodes = {nid: MetricNode(nid, i, models[nid], COUNTS[nid],
                                 metrics=(node_metrics or {}).get(nid))
                 for i, nid in enumerate(NODES)}
    loop = TamperingGrid(nodes, tamper=tamper, lie=lie, drop=drop)
    guarded = Guarded(fedavg(), example_limits=ExampleLimits(default=1000))
    grid = SecureAggregationGrid(loop, s or settings(), reply_spec=array_spec,
                                 rng=random.Random(0))
    messages = guarded.configure_train(1, ArrayRecord({k: Array(v) for k, v in x.items()}),
                                       strategy_config(defaults), loop)
    replies = grid.send_and_receive(messages)
    arrays, metrics = guarded.aggregate_train(1, replies)
    return arrays, metrics, loop, replies


def tolerance(keep: list[int], s=None) -> float:
    """The quantization bound of tests/test_secagg.py, plus float32 rounding."""
    s = s or settings()
    r = sum(round(COUNTS[n] / s.max_weight * s.quantization_range) for n in keep)
    return (2 * s.clipping_range * len(keep) + 0.07 * len(keep)) / r + 1e-6


def assert_mean_update(arrays, x, expected: float, keep: list[int]) -> None:
    assert arrays is not None, "the round was not aggregated"
    for k in x:
        update = arrays[k].numpy().astype(np.float64) - x[k].astype(np.float64)
        assert np.abs(update - expected).max() <= tolerance(keep), (k, update.ravel()[:3], expected)


def configs(reply: Message):
    return reply.content.config_records[RECORD_KEY_CONFIGS]


# ------------------------------------------------------------------ tampering, per stage
def drop_pk1(reply):
    del configs(reply)[Key.PUBLIC_KEY_1]


def copy_pk_of_101(grid_holder):
    def tamper(reply):
        configs(reply)[Key.PUBLIC_KEY_1] = configs(grid_holder[0].delivered[(Stage.SETUP, 101)])[
            Key.PUBLIC_KEY_1]
    return tamper


def not_a_key(reply):
    configs(reply)[Key.PUBLIC_KEY_2] = b"-----BEGIN PUBLIC KEY-----\ngarbage\n"


def unequal_share_lists(reply):
    record = configs(reply)
    record[Key.CIPHERTEXT_LIST] = list(record[Key.CIPHERTEXT_LIST])[:-1]


def stranger_destination(reply):
    record = configs(reply)
    record[Key.DESTINATION_LIST] = [999] + list(record[Key.DESTINATION_LIST])[1:]


def epsilon_x(reply):
    reply.content.config_records["fitres.metrics"][wire.DP_EPSILON] = "x"


def epsilon_nan(reply):
    reply.content.config_records["fitres.metrics"][wire.DP_EPSILON] = float("nan")


def num_examples_nan(reply):
    reply.content.metric_records["fitres.num_examples"]["num_examples"] = float("nan")


def float_vector(reply):
    record = configs(reply)
    vectors = [bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS]]
    record[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(v.astype(np.float64)) for v in vectors]


def out_of_range_vector(reply):
    record = configs(reply)
    vectors = [bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS]]
    vectors[1] = vectors[1].astype(np.int64) + 2**40
    record[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(v) for v in vectors]


def short_share_list(reply):
    record = configs(reply)
    record[Key.SHARE_LIST] = list(record[Key.SHARE_LIST])[:-1]


def duplicate_shares(reply):
    record = configs(reply)
    shares = list(record[Key.SHARE_LIST])
    record[Key.SHARE_LIST] = [shares[0]] * len(shares)


def garbage_shares(reply):
    """Well-formed shares (their own index, the right length) with random values."""
    record = configs(reply)
    record[Key.SHARE_LIST] = [s[:4] + os.urandom(len(s) - 4) for s in record[Key.SHARE_LIST]]


def garbage_bytes(reply):
    record = configs(reply)
    record[Key.SHARE_LIST] = [b"\x00" * 3 for _ in record[Key.SHARE_LIST]]


# (stage, tamper, whether the tampered node's upload is in the sum)
CASES = {
    "setup: no pk1": (Stage.SETUP, drop_pk1, False),
    "setup: a public key that does not parse": (Stage.SETUP, not_a_key, False),
    "share-keys: lists of unequal length": (Stage.SHARE_KEYS, unequal_share_lists, False),
    "share-keys: a destination that is no neighbour": (Stage.SHARE_KEYS, stranger_destination, False),
    "collect: dp-epsilon = 'x'": (Stage.COLLECT_MASKED_VECTORS, epsilon_x, False),
    "collect: dp-epsilon = NaN": (Stage.COLLECT_MASKED_VECTORS, epsilon_nan, False),
    "collect: num-examples = NaN": (Stage.COLLECT_MASKED_VECTORS, num_examples_nan, False),
    "collect: a float vector": (Stage.COLLECT_MASKED_VECTORS, float_vector, False),
    "collect: values beyond the modulus": (Stage.COLLECT_MASKED_VECTORS, out_of_range_vector, False),
    # In the unmask stage the node has uploaded: its update stays in the sum (as for a
    # node that drops out in that stage); only its shares are refused.
    "unmask: share list shorter than its id list": (Stage.UNMASK, short_share_list, True),
    "unmask: duplicate shares": (Stage.UNMASK, duplicate_shares, True),
    "unmask: garbage shares": (Stage.UNMASK, garbage_shares, True),
    "unmask: shares that are not shares": (Stage.UNMASK, garbage_bytes, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_tampered_reply_makes_that_node_a_dropout_not_a_crash(defaults, case, caplog):
    stage, tamper, in_sum = CASES[case]
    x = model(0)
    with caplog.at_level(logging.WARNING):
        arrays, metrics, loop, replies = run_round(x, tamper={(stage, TAMPERED): tamper},
                                                   defaults=defaults)
    keep = NODES if in_sum else [n for n in NODES if n != TAMPERED]
    assert_mean_update(arrays, x, MEAN_OF_ALL if in_sum else MEAN_WITHOUT_103, keep)
    assert metrics[wire.ROUND_AGGREGATED] == 1
    assert metrics[SURVIVORS] == len(keep)
    assert metrics[DROPOUTS] == len(NODES) - len(keep)
    assert metrics[MALFORMED] == 1  # counted ...
    info = replies[0].content.config_records[SECAGG_RECORD]
    assert list(info[MALFORMED_NODES]) == [TAMPERED]  # ... and named
    assert any(str(TAMPERED) in r.getMessage() and stage in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_copied_public_key_drops_both_holders_and_the_round_goes_on(defaults):
    """A node that replays another's public key would make every common neighbour's mod
    raise ("Some public keys are identical"); the server refuses both holders instead."""
    x = model(0)
    holder: list = []
    models = constant_models(x)
    nodes = {nid: MetricNode(nid, i, models[nid], COUNTS[nid]) for i, nid in enumerate(NODES)}
    tamper = {(Stage.SETUP, TAMPERED): copy_pk_of_101(holder)}
    loop = TamperingGrid(nodes, tamper=tamper)
    holder.append(loop)
    guarded = Guarded(fedavg(), example_limits=ExampleLimits(default=1000))
    grid = SecureAggregationGrid(loop, settings(), reply_spec=array_spec, rng=random.Random(0))
    messages = guarded.configure_train(1, ArrayRecord({k: Array(v) for k, v in x.items()}),
                                       strategy_config(defaults), loop)
    replies = grid.send_and_receive(messages)
    arrays, metrics = guarded.aggregate_train(1, replies)
    keep = [n for n in NODES if n not in (101, TAMPERED)]
    # (40*.02 + 100*.04 + 7*.05 + 60*.06 + 33*.07) / 240 = 11.06 / 240
    assert_mean_update(arrays, x, 11.06 / 240, keep)
    assert metrics[MALFORMED] == 2
    assert sorted(replies[0].content.config_records[SECAGG_RECORD][MALFORMED_NODES]) == [101, 103]


def garbage_dead_shares(reply):
    """Garbage (well-formed) shares for the dropped nodes' keys only."""
    record = configs(reply)
    dead = set(record[Key.NODE_ID_LIST]) - set(ACTIVE_SEEN[reply.metadata.src_node_id])
    record[Key.SHARE_LIST] = [s[:4] + os.urandom(len(s) - 4) if nid in dead else s
                              for nid, s in zip(record[Key.NODE_ID_LIST], record[Key.SHARE_LIST])]


ACTIVE_SEEN: dict[int, list[int]] = {}


def remember_active(request):
    ACTIVE_SEEN[request.metadata.dst_node_id] = list(configs(request)[Key.ACTIVE_NODE_ID_LIST])


def test_a_wrong_share_for_a_dropped_nodes_key_is_caught(defaults):
    """Node 105 drops before uploading: its pairwise-mask key is rebuilt from shares; 103
    sends garbage shares of it. The rebuilt key is checked against 105's public key, so
    even with 4 shares of threshold 3 (too few to outvote a wrong one) it is found."""
    assert 105 in neighbourhoods(NODES, 5, random.Random(0))[TAMPERED]  # the grid's graph
    x = model(0)
    arrays, metrics, _, replies = run_round(
        x, tamper={(Stage.UNMASK, TAMPERED): garbage_dead_shares},
        lie={(Stage.UNMASK, TAMPERED): remember_active},
        drop={Stage.COLLECT_MASKED_VECTORS: {105}}, defaults=defaults)
    keep = [n for n in NODES if n != 105]
    # (11.91 - 7*.05) / 268 = 11.56 / 268
    assert_mean_update(arrays, x, 11.56 / 268, keep)
    assert metrics[MALFORMED] == 1


def test_too_many_garbage_shares_fail_the_round_cleanly(defaults):
    """Three of seven nodes send garbage shares (threshold 3 of 5 shares): some secret
    cannot be decided. The round is skipped with the reason, never an exception."""
    x = model(0)
    tamper = {(Stage.UNMASK, n): garbage_shares for n in (101, 102, 103)}
    arrays, metrics, _, replies = run_round(x, tamper=tamper, defaults=defaults)
    assert arrays is None and metrics[wire.ROUND_AGGREGATED] == 0
    assert replies[0].has_error() and "secure aggregation failed" in replies[0].error.reason
    assert metrics["secagg-failed"] == 1


# ------------------------------------------------------------------ influence is bounded
def add_to_first_coordinate(amount: int):
    def tamper(reply):
        record = configs(reply)
        vectors = [bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS]]
        v = vectors[1].copy()
        v.flat[0] = (int(v.flat[0]) + amount) % 2**32
        vectors[1] = v
        record[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in vectors]
    return tamper


def test_adding_2_to_the_31_to_one_masked_coordinate_is_rejected(defaults, caplog):
    """Masked values are uniform mod 2^32, so the server cannot see the tampering in the
    upload; the unmasked sum is outside what 7 clients clipped to +-c can produce."""
    x = model(0)
    with caplog.at_level(logging.WARNING):
        arrays, metrics, _, replies = run_round(
            x, tamper={(Stage.COLLECT_MASKED_VECTORS, TAMPERED): add_to_first_coordinate(2**31)},
            defaults=defaults)
    assert arrays is None  # the global model is left unchanged
    assert metrics[wire.ROUND_AGGREGATED] == 0 and metrics["secagg-failed"] == 1
    assert replies[0].has_error() and "outside" in replies[0].error.reason


def test_a_shift_within_the_bound_goes_undetected_but_stays_within_it(defaults):
    """What a malicious client can still do (docs/secure-aggregation.md): add up to the
    room the range check leaves. Adding T (one client's whole range) to one coordinate
    moves that coordinate of the mean by 2c T / sum_i r_i, and nothing else."""
    x = model(0)
    s = settings()
    arrays, metrics, _, _ = run_round(
        x, tamper={(Stage.COLLECT_MASKED_VECTORS, TAMPERED): add_to_first_coordinate(
            s.quantization_range)}, defaults=defaults)
    assert arrays is not None
    r = sum(round(COUNTS[n] / s.max_weight * s.quantization_range) for n in NODES)
    shift = 2 * s.clipping_range * s.quantization_range / r
    keys = sorted(x)  # the upload's order: sorted keys, the first array is keys[0]
    update = arrays[keys[0]].numpy().astype(np.float64) - x[keys[0]]
    assert abs(update.flat[0] - MEAN_OF_ALL - shift) <= tolerance(NODES)
    rest = np.delete(update.ravel(), 0)
    assert np.abs(rest - MEAN_OF_ALL).max() <= tolerance(NODES)
    # and the server's bound: |mean| <= m c T / sum r_i per coordinate
    assert abs(update.flat[0]) <= len(NODES) * s.clipping_range * s.quantization_range / r


# ------------------------------------------------------------------ a lying server
def test_the_client_refuses_an_unmask_request_whose_active_and_dead_lists_overlap(defaults):
    """Listing a node as both active and dead would hand the server both its mask seed
    share and its pairwise-key share: with enough of them, its individual vector."""
    target = 101
    seen = {}

    def overlap(request):
        record = configs(request)
        active = list(record[Key.ACTIVE_NODE_ID_LIST])
        victim = next(n for n in active if n != target)
        seen["victim"] = victim
        record[Key.DEAD_NODE_ID_LIST] = list(record[Key.DEAD_NODE_ID_LIST]) + [victim]

    x = model(0)
    arrays, metrics, loop, _ = run_round(x, lie={(Stage.UNMASK, target): overlap},
                                         defaults=defaults)
    reply = loop.delivered[(Stage.UNMASK, target)]
    assert reply.has_error(), "the client answered an unmask request listing a node twice"
    assert "both" in reply.error.reason and str(seen["victim"]) in reply.error.reason
    # the others' shares suffice: the round still aggregates every upload
    assert_mean_update(arrays, x, MEAN_OF_ALL, NODES)


def test_the_client_refuses_its_own_id_in_the_dead_list(defaults):
    def self_dead(request):
        record = configs(request)
        record[Key.DEAD_NODE_ID_LIST] = list(record[Key.DEAD_NODE_ID_LIST]) + [101]

    x = model(0)
    _, _, loop, _ = run_round(x, lie={(Stage.UNMASK, 101): self_dead}, defaults=defaults)
    assert loop.delivered[(Stage.UNMASK, 101)].has_error()


def test_the_client_refuses_a_threshold_of_half_the_shares_or_less(defaults):
    """A server that sets the threshold to 2 of 5 shares could collect mask-seed shares
    of a node from some neighbours and pairwise-key shares from the others."""
    def low_threshold(request):
        configs(request)[Key.THRESHOLD] = 2

    x = model(0)
    lie = {(Stage.SETUP, n): low_threshold for n in NODES}
    arrays, metrics, loop, replies = run_round(x, lie=lie, defaults=defaults)
    for n in NODES:
        reply = loop.delivered[(Stage.SETUP, n)]
        assert reply.has_error() and "threshold" in reply.error.reason
    assert arrays is None and replies[0].has_error()


@pytest.mark.parametrize("shares, threshold, ok", [(5, 3, True), (3, 2, True), (7, 4, True),
                                                   (5, 2, False), (7, 3, False), (9, 4, False)])
def test_a_threshold_of_half_the_shares_or_less_is_refused_naming_both_keys(shares, threshold, ok):
    problems = settings_problems(settings(num_shares=shares, threshold=threshold))
    if ok:
        assert problems == []
    else:
        assert problems and "secagg-num-shares" in problems[0] \
            and "secagg-reconstruction-threshold" in problems[0] and "half" in problems[0]


def test_the_run_config_refuses_a_threshold_of_half_the_shares(make_config):
    with pytest.raises(ValueError, match="secagg-reconstruction-threshold") as err:
        make_config(**{"secagg": True, "secagg-num-shares": 7,
                       "secagg-reconstruction-threshold": 3})
    assert "secagg-num-shares" in str(err.value)


# ------------------------------------------------------------------ plaintext
def test_only_the_plaintext_the_protocol_needs_travels_per_client(defaults):
    x = model(0)
    metrics_with_dp = {wire.TRAIN_LOSS: 0.5, wire.LOCAL_SECONDS: 1.0, wire.DP_EPSILON: 2.5,
                       wire.DP_DELTA: 1e-5, wire.LOCAL_STEPS: 3}
    _, metrics, loop, replies = run_round(
        x, node_metrics={n: metrics_with_dp for n in NODES}, defaults=defaults)
    for n in NODES:
        upload = loop.delivered[(Stage.COLLECT_MASKED_VECTORS, n)]
        plain = dict(upload.content.config_records["fitres.metrics"])
        assert set(plain) <= {wire.DP_EPSILON}, plain  # no loss, timing, steps, clip count
    assert list(replies[0].content.config_records[SECAGG_RECORD]["dp-epsilon"]) == [2.5] * 7
    assert wire.LOCAL_SECONDS not in metrics


def test_training_metrics_are_summed_inside_the_protocol(defaults):
    """train-loss / train-accuracy reach the server only as their num-examples-weighted
    means, computed inside the masked sum."""
    x = model(0)
    losses = {n: 0.1 * i + 0.2 for i, n in enumerate(NODES)}
    node_metrics = {n: {wire.TRAIN_LOSS: losses[n], wire.TRAIN_ACCURACY: 1 - losses[n] / 2}
                    for n in NODES}
    _, metrics, loop, _ = run_round(x, node_metrics=node_metrics, defaults=defaults)
    total = sum(COUNTS.values())
    want = sum(COUNTS[n] * losses[n] for n in NODES) / total
    assert math.isclose(metrics[wire.TRAIN_LOSS], want, abs_tol=1e-4)
    assert math.isclose(metrics[wire.TRAIN_ACCURACY], 1 - want / 2, abs_tol=1e-4)
    for n in NODES:
        plain = loop.delivered[(Stage.COLLECT_MASKED_VECTORS, n)].content.config_records[
            "fitres.metrics"]
        assert wire.TRAIN_LOSS not in plain


def test_a_non_finite_metric_makes_that_client_a_dropout_not_the_round_a_failure(defaults):
    x = model(0)
    node_metrics = {n: {wire.TRAIN_LOSS: 0.5} for n in NODES}
    node_metrics[TAMPERED] = {wire.TRAIN_LOSS: float("nan")}
    arrays, metrics, loop, _ = run_round(x, node_metrics=node_metrics, defaults=defaults)
    keep = [n for n in NODES if n != TAMPERED]
    assert_mean_update(arrays, x, MEAN_WITHOUT_103, keep)
    assert metrics[wire.ROUND_AGGREGATED] == 1 and metrics[DROPOUTS] == 1
    assert math.isclose(metrics[wire.TRAIN_LOSS], 0.5, abs_tol=1e-4)
    assert loop.delivered[(Stage.COLLECT_MASKED_VECTORS, TAMPERED)].has_error()


def test_the_summed_metric_names_are_the_clients_names():
    from strategies.scaffold import COMMITTED_METRIC
    from strategies.secagg import SUMMED_MEANS

    assert COMMITTED_METRIC in SUMMED_MEANS
    assert wire.TRAIN_LOSS in SUMMED_MEANS and wire.TRAIN_ACCURACY in SUMMED_MEANS


def test_a_flag_every_client_raises_reads_exactly_one(defaults):
    """SCAFFOLD's committed flag, summed inside the protocol, reads 1.0 / 0.0 exactly when
    every client reports 1 / 0 (tests/test_e2e.py compares it with ==)."""
    x = model(0)
    for flag in (0, 1):
        _, metrics, _, _ = run_round(x, node_metrics={n: {"scaffold-committed": flag}
                                                      for n in NODES}, defaults=defaults)
        assert metrics["scaffold-committed"] == float(flag)


def test_sequential_combine_equals_flowers_combine_shares():
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

    from strategies.secagg import combine_shares_sequential

    rng = random.Random(3)
    for length, (t, n) in [(32, (3, 5)), (185, (4, 7)), (16, (2, 3))]:
        secret = bytes(rng.randrange(256) for _ in range(length))
        shares = create_shares(secret, t, n)
        for subset in (shares[:t], shares[-t:], shares):
            assert combine_shares_sequential(subset) == combine_shares(subset) == secret
        bad = [shares[0][:4] + os.urandom(len(shares[0]) - 4)] + shares[1:t]
        try:
            want = combine_shares(bad)
        except ValueError:
            with pytest.raises(ValueError):
                combine_shares_sequential(bad)
        else:
            assert combine_shares_sequential(bad) == want


def test_the_masked_upload_travels_as_uint32(defaults):
    """Values below the modulus 2^32 fit 4 bytes: the upload is the size of a float32
    reply, not the mod's int64 (twice that)."""
    x = model(0)
    _, metrics, loop, _ = run_round(x, defaults=defaults)
    reply = loop.delivered[(Stage.COLLECT_MASKED_VECTORS, 101)]
    arrays = [bytes_to_ndarray(b) for b in configs(reply)[Key.MASKED_PARAMETERS]]
    assert all(a.dtype == np.uint32 for a in arrays)
    values = sum(a.size for a in arrays)
    assert metrics[wire.UPLOAD_BYTES] < 4 * values + 200 * len(arrays)  # + .npy headers
