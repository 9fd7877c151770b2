"""SecAgg+ masks: the cryptographic PRG (strategies/secagg_prg.py) on client and server.

Flower 1.42's ``pseudo_rand_gen`` folds a 32-byte seed into a 32-bit MT19937 seed; this
project expands masks with AES-256-CTR under HKDF-SHA256(seed) instead, on the client
(installed where ``secaggplus_mod`` looks the function up) and on the server (its own
unmasking). These tests check the replacement is real on both sides.
"""

from __future__ import annotations

import importlib
import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from strategies.guard import ExampleLimits, Guarded
from strategies.secagg import SecureAggregationGrid, unmask
from strategies.validation import array_spec
from tests.helpers import LoopbackGrid
from tests.test_secagg import COUNTS, NODES, client_models, fedavg, make_nodes, model, settings, strategy_config

MOD = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
SHAPES = [(1,), (100, 1000)]  # 100,001 values
SEED = bytes(range(32))


def flip(seed: bytes, bit: int) -> bytes:
    out = bytearray(seed)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a).ravel() for a in arrays])


def test_flower_prg_gives_identical_masks_for_different_seeds():
    """The upstream bug (reproducer in docs/secure-aggregation.md): flipping the same bit
    in two 4-byte words of the seed leaves Flower's 32-bit fold, hence the mask,
    unchanged. If this starts failing, Flower has fixed its expansion: revisit
    strategies/secagg_prg.py."""
    other = flip(flip(SEED, 0), 32)
    assert other != SEED
    assert np.array_equal(flat(pseudo_rand_gen(SEED, 2**32, SHAPES)),
                          flat(pseudo_rand_gen(other, 2**32, SHAPES)))


@pytest.mark.parametrize("bits", [(0,), (255,), (0, 32), (7, 39, 71)])
def test_seeds_differing_in_a_bit_give_unrelated_masks(bits):
    from strategies.secagg_prg import mask_arrays

    other = SEED
    for bit in bits:
        other = flip(other, bit)
    a = flat(mask_arrays(SEED, 2**32, SHAPES))
    b = flat(mask_arrays(other, 2**32, SHAPES))
    # Independent uniform 32-bit values agree with probability 2^-32 each
    assert np.count_nonzero(a == b) <= 1
    assert abs(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1]) < 0.02
    # and the difference mod 2^32 is uniform too (no linear relation)
    diff = (a - b) % 2**32
    assert abs(diff.mean() / 2**32 - 0.5) < 0.01


def test_masks_are_uniform_mod_2_to_the_32():
    from strategies.secagg_prg import mask_arrays

    values = flat(mask_arrays(SEED, 2**32, [(1_000_000,)]))
    assert values.dtype == np.int64 and values.min() >= 0 and values.max() < 2**32
    assert values.max() > 2**32 - 2**16  # the top of the range is reached (Flower's stops at 2^32 - 2)
    for name, buckets in (("high byte", values >> 24), ("low byte", values & 0xFF),
                          ("middle byte", (values >> 12) & 0xFF)):
        counts = np.bincount(buckets, minlength=256)
        expected = len(values) / 256
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        # 255 degrees of freedom: mean 255, sd 22.6; 380 is ~5.5 sd (p ~ 1e-6)
        assert chi2 < 380, (name, chi2)
    bits = np.unpackbits(values.astype("<u4").view(np.uint8))
    assert abs(bits.mean() - 0.5) < 0.001


def test_other_ranges_and_layouts():
    from strategies.secagg_prg import mask_arrays

    out = mask_arrays(SEED, 1000, [(), (3, 4), (0,), (5,)])
    assert [a.shape for a in out] == [(), (3, 4), (0,), (5,)]
    assert all(a.dtype == np.int64 and (a.size == 0 or (a.min() >= 0 and a.max() < 1000)) for a in out)
    small = flat(mask_arrays(SEED, 2**8, [(100_000,)]))
    assert small.max() == 255 and small.min() == 0
    # the same seed, the same masks; a longer expansion starts with the shorter one
    assert np.array_equal(flat(mask_arrays(SEED, 2**32, [(10,)])),
                          flat(mask_arrays(SEED, 2**32, [(4,), (6,)])))
    with pytest.raises(ValueError):
        mask_arrays(SEED, 2**33, [(1,)])
    with pytest.raises(ValueError):
        mask_arrays(b"short", 2**32, [(1,)])


def test_client_and_server_expansions_agree():
    """The function Flower's mod calls under the gate is the server's ``mask_arrays``;
    outside the gate it is still Flower's own (narrow scope)."""
    from fl_app.secagg_client import cryptographic_masks
    from strategies.secagg_prg import mask_arrays

    with cryptographic_masks():
        inside = MOD.pseudo_rand_gen(SEED, 2**32, SHAPES)
    assert np.array_equal(flat(inside), flat(mask_arrays(SEED, 2**32, SHAPES)))
    outside = MOD.pseudo_rand_gen(SEED, 2**32, SHAPES)
    assert np.array_equal(flat(outside), flat(pseudo_rand_gen(SEED, 2**32, SHAPES)))


def test_the_masks_a_client_uploads_are_the_cryptographic_ones(defaults):
    """From a node's real protocol state (its mask seed b, its sk1 and its neighbours'
    public keys, in Context.state), remove the AES-CTR masks from the vector it uploaded:
    what is left must be a quantized vector, every value in [0, T]. (With Flower's
    expansion on the client it is uniform noise mod 2^32.)"""
    from strategies.secagg_prg import mask_arrays

    x = model(0)
    nodes = make_nodes(client_models(x, seed=1), COUNTS)
    loop = LoopbackGrid(nodes)
    s = settings()
    guarded = Guarded(fedavg(), example_limits=ExampleLimits(default=1000))
    grid = SecureAggregationGrid(loop, s, reply_spec=array_spec, rng=random.Random(0))
    messages = guarded.configure_train(1, ArrayRecord({k: Array(v) for k, v in x.items()}),
                                       strategy_config(defaults), loop)
    grid.send_and_receive(messages)
    uploads = [r for stage, r in loop.received if stage == Stage.COLLECT_MASKED_VECTORS]
    for reply in uploads:
        nid = reply.metadata.src_node_id
        state = nodes[nid].context.state.config_records[RECORD_KEY_STATE]
        vector = [bytes_to_ndarray(b).astype(np.int64)
                  for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        shapes = [a.shape for a in vector]
        out = [(v - m) for v, m in zip(vector, mask_arrays(state["rd_seed"], 2**32, shapes))]
        keys = dict(zip(state["public_keys_dict:K"], zip(state["public_keys_dict:V"][::2],
                                                         state["public_keys_dict:V"][1::2])))
        for other in state["rd_seed_share_dict:K"]:
            if other == nid:
                continue
            shared = generate_shared_key(bytes_to_private_key(state["sk1"]),
                                         bytes_to_public_key(keys[other][0]))
            mask = mask_arrays(shared, 2**32, shapes)
            out = [(o - m) if nid > other else (o + m) for o, m in zip(out, mask)]
        values = flat([o % 2**32 for o in out])
        assert values.max() <= s.quantization_range, nid


def test_the_server_unmasks_with_the_cryptographic_prg():
    """``unmask`` removes AES-CTR masks (with Flower's, this would leave noise)."""
    from strategies.secagg_prg import mask_arrays

    rng = np.random.default_rng(0)
    shapes = [(1,), (4, 3)]
    q = [np.array([7]), rng.integers(0, 2**22, size=(4, 3))]
    seed = bytes(rng.integers(0, 256, size=32, dtype=np.uint8))
    masked = [(a + m) % 2**32 for a, m in zip(q, mask_arrays(seed, 2**32, shapes))]
    out = unmask(masked, graph={1: {1}}, in_sum={1}, dropped=set(), seeds={1: seed}, sk1={},
                 public_keys={}, modulus=2**32)
    assert all(np.array_equal(a, b) for a, b in zip(out, q))


def test_a_client_with_flowers_expansion_cannot_pass(defaults, monkeypatch):
    """If the client's mod used Flower's expansion while the server uses AES-CTR, nothing
    unmasks: the round is rejected by the range check, never silently wrong."""
    import fl_app.secagg_client as client

    monkeypatch.setattr(client, "_GATE_PRG", pseudo_rand_gen)
    x = model(0)
    nodes = make_nodes(client_models(x, seed=1), COUNTS)
    loop = LoopbackGrid(nodes)
    guarded = Guarded(fedavg(), example_limits=ExampleLimits(default=1000))
    grid = SecureAggregationGrid(loop, settings(), reply_spec=array_spec, rng=random.Random(0))
    messages = guarded.configure_train(1, ArrayRecord({k: Array(v) for k, v in x.items()}),
                                       strategy_config(defaults), loop)
    replies = grid.send_and_receive(messages)
    arrays, _ = guarded.aggregate_train(1, replies)
    assert arrays is None and replies[0].has_error()
    assert len(NODES) == 7


def test_the_chunked_expansion_is_the_plain_keystream():
    """``mask_arrays`` writes the keystream in chunks; the values are the keystream read
    as little-endian uint32 (uint64 mod the range for other ranges), however cut."""
    from strategies.secagg_prg import _CHUNK, keystream, mask_arrays

    n = _CHUNK  # four chunks of uint32, two of uint64, and a remainder
    got = flat(mask_arrays(SEED, 2**32, [(3,), (n,)]))
    assert np.array_equal(got, np.frombuffer(keystream(SEED, 4 * (n + 3)), "<u4").astype(np.int64))
    got = flat(mask_arrays(SEED, 1000, [(n // 3,)]))
    want = np.frombuffer(keystream(SEED, 8 * (n // 3)), "<u8") % np.uint64(1000)
    assert np.array_equal(got, want.astype(np.int64))
