"""SecAgg+ for the app's Message-API strategies: the server sees only the weighted sum.

Bell, Bonawitz, Gascon, Lepoint, Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", ACM CCS 2020 (SecAgg+), building on Bonawitz et al.,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", ACM CCS 2017.
The threat model (what holds against a curious server, a lying server and malicious
clients) is in docs/secure-aggregation.md.

What the protocol computes. Client i holds a vector v_i and a weight n_i (its
``num-examples``). It uploads Q(r_i * v_i / T) and the integer r_i = round(T n_i / W)
(T = ``quantization_range``, W = ``max_weight``, Q = stochastic quantization of values
clipped to +-``clipping_range`` onto the integers [0, T]), masked with a private mask
(seed b_i) and pairwise masks shared with its neighbours in a random k-regular graph
(k + 1 = ``num_shares``). The masks cancel in the sum mod ``modulus_range``; the server
reconstructs, from at least ``threshold`` Shamir shares each, b_i of every client whose
vector is in the sum and the pairwise-mask key sk1_d of every client d that shared keys
but dropped before its vector arrived. What it learns is

    sum_i r_i * v_i  and  sum_i r_i,   hence the weighted mean  sum_i r_i v_i / sum_i r_i,

which equals the num-examples-weighted mean up to quantization (bound below). Every
strategy whose aggregate is a function of that weighted mean (FedAvg and the
server-optimizer family, ``LINEAR``) and SCAFFOLD (whose two updates are
sums, see ``strategies/scaffold.py``) gets exactly its usual input: one reply holding
the weighted mean and ``num-examples`` = sum_i n_i. The strategies do not change.

What travels. The client uploads its *update*, v_i = y_i - x for the model keys (x: the
arrays it was sent) and its other reply arrays as they are (SCAFFOLD's Delta c_i), in
sorted key order, then one array of ``SUMMED_SIZE`` values that carries its training
metrics into the masked sum (``summed_metrics``; ``fl_app/secagg_client.py``); the
server adds x back. In plaintext, per client, only what the protocol needs:
``num-examples`` (the weights' cross-check below) and, under DP, ``dp-epsilon``
(``PLAINTEXT_METRICS``); everything else the handler reports stays on the client or is
summed inside the protocol.

Error bound (per coordinate, from Flower's ``quantize``: stochastic rounding to a grid of
step 2c/T): |mean_secure - mean_r| <= m * (2c/T) / sum_i (r_i/T) for the m surviving
clients, where mean_r is the mean with the quantized weights r_i/T; the weights
themselves differ from n_i/W by at most 1/(2T) each. ``tests/test_secagg.py`` checks
the result against the plain aggregate within this bound.

Against malicious clients (``tests/test_secagg_malicious.py``): every reply of every
stage is parsed defensively; a malformed, inconsistent or out-of-range reply makes
its node a dropout for the round (counted in ``MALFORMED``, named in the log and in
the reply's ``secagg`` record), never an exception. Shamir reconstruction tolerates
wrong shares up to the unique-decoding bound and checks every rebuilt pairwise-mask
key against its owner's public key; the unmasked sum must lie in [0, m T] per
coordinate (what m clients clipped to +-c can produce) and its weight sum must match
the clients' plaintext num-examples. A failure there skips the round
(``SecAggFailed``, model unchanged).

Building blocks: Flower's ``secaggplus_mod`` on the client, with its mask expansion
replaced (``strategies/secagg_prg.py``: AES-256-CTR keyed by HKDF-SHA256 of the whole
seed, instead of Flower's 32-bit MT19937 seeding), and ``flwr.common.secure_aggregation``
(Shamir shares, key agreement, quantization) on the server. This module is the server
half of the protocol for the Message API: Flower 1.42 has it only for the legacy
strategy API (``SecAggPlusWorkflow``,
flwr/server/workflow/secure_aggregation/secaggplus_workflow.py), which it follows, with
two corrections: nodes that dropped before sharing keys are not expected to have shares
(Flower's workflow asks for shares of every sampled node and would fail the round), and
a dropped node's pairwise masks are removed only for neighbours whose vectors are in the
sum and that exchanged keys with it.

Where it sits. ``SecureAggregationGrid`` wraps the ServerApp's ``Grid``: every train
``send_and_receive`` becomes the four SecAgg+ stages and returns ONE reply (or one error
reply when the protocol fails); everything else passes through. The reply carries a
``secagg`` ConfigRecord naming the nodes whose contributions are in the sum (SCAFFOLD's
commit protocol needs it; ``Guarded`` counts them). Individual updates are never
visible to the strategy, to ``Guarded`` or to anything else on the server.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from Crypto.Util.Padding import unpad
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    generate_shared_key,
)
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.serverapp import Grid
from flwr.supercore import log
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    public_key_to_bytes,
)

from fl_common import wire
from fl_common.arrays import ArrayList

from .grid_wrapper import DelegatingGrid
from .secagg_prg import mask_arrays
from .validation import ArraySpec

# Strategies whose aggregate is a num-examples-weighted mean of the replies (optionally
# followed by a server optimizer step): the only ones that stay correct when secure
# aggregation hides the individual replies and reveals only their weighted sum...
LINEAR = ("fedavg", "fedprox", "fedadam", "fedavgm", "fedyogi", "fedadagrad")
# ... and SCAFFOLD, whose two updates are sums too (sum_S n_i y_i and sum_S n_i Delta c_i
# under its default num-examples weighting).
SECAGG_STRATEGIES = (*LINEAR, "scaffold")
SECAGG_RECORD = "secagg"  # ConfigRecord in the one reply a secure round returns
NODES = "nodes"  # node ids whose contributions are in the sum
DROPPED = "dropped"  # node ids sampled but not in the sum
MALFORMED_NODES = "malformed"  # node ids whose replies were refused this round
DP_EPSILONS = "dp-epsilon"  # the contributors' plaintext DP spends (fl_app/privacy.py)
SECAGG_ERROR_CODE = 4272  # error code of the reply of a round whose protocol failed
MODULUS_RANGE = 2**32  # Flower's default; the sum of m values < T must stay below it
# Round metrics of a secure round (in the one reply's MetricRecord)
SURVIVORS = "secagg-survivors"
DROPOUTS = "secagg-dropouts"
MALFORMED = "secagg-malformed"  # nodes whose reply was refused (malformed, inconsistent)
SECAGG_FAILED = "secagg-failed"  # 1 in a round whose protocol failed (Guarded's stats)
CLIPPED = "secagg-clipped"  # contributors whose clipping range cut a value (summed inside)

# Per-client plaintext under SecAgg+, besides num-examples: the DP spend (Guarded reports
# its maximum, which no sum can give). The client sends nothing else in plaintext.
PLAINTEXT_METRICS = (wire.DP_EPSILON,)
# Training metrics whose num-examples-weighted mean is computed inside the masked sum;
# value -> scale (one unit = scale x clipping range, so a loss up to 16 is not clipped).
# "scaffold-committed" is strategies.scaffold.COMMITTED_METRIC (scaffold imports this
# module; tests/test_secagg_malicious.py checks the two names agree).
SUMMED_MEANS = {wire.TRAIN_LOSS: 1 / 16, wire.TRAIN_ACCURACY: 1 / 2, "scaffold-committed": 1 / 2}
SUMMED_SIZE = 1 + 2 * len(SUMMED_MEANS)  # [clipped flag] + (present, value) per mean
_FLAG = 0.5  # a flag is worth half the clipping range
KEY_CURVE = ec.SECP384R1.name  # flwr.supercore.primitives.asymmetric.generate_key_pairs
MAX_KEY_BYTES = 4096
MAX_SHARE_BYTES = 4096
MAX_DECODING_BASES = 128  # subsets of shares tried per secret when some disagree



# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class SecAggSettings:
    """The protocol's parameters (run-config ``secagg-*`` keys)."""

    num_shares: int
    threshold: int
    clipping_range: float
    quantization_range: int
    max_weight: float
    timeout: float
    modulus_range: int = MODULUS_RANGE

    def check(self) -> "SecAggSettings":
        """Raise ``ValueError`` naming the first bad setting; return self."""
        problems = settings_problems(self)
        if problems:
            raise ValueError(problems[0])
        return self

    def check_sampled(self, sampled: int) -> None:
        """Raise if a round of ``sampled`` clients can never complete the protocol."""
        if sampled < 3:
            raise ValueError(
                f"SecAgg+ needs at least 3 clients sampled per round (each client's secrets "
                f"are split among an odd neighbourhood of >= 3, itself included); {sampled} "
                f"are sampled. Start more nodes or raise 'min-train-nodes' / 'fraction-train' "
                f"to sample >= 3, or set secagg = false")
        if self.num_shares > sampled:
            raise ValueError(
                f"Run config 'secagg-num-shares' = {self.num_shares} exceeds the {sampled} "
                f"clients sampled per round: each client's secrets are split into one share "
                f"per neighbour (itself included). Set 'secagg-num-shares' to an odd number "
                f"<= {sampled} (or \"auto\"), or sample more clients ('fraction-train', "
                f"'min-train-nodes')")
        if sampled < self.threshold:
            raise ValueError(
                f"{sampled} clients sampled per round is below 'secagg-reconstruction-"
                f"threshold' = {self.threshold}: no secret could be reconstructed")
        if sampled * self.quantization_range >= self.modulus_range:
            raise ValueError(
                f"{sampled} clients x 'secagg-quantization-range' {self.quantization_range} "
                f">= the modulus 2^32: the masked sum would overflow. Lower "
                f"'secagg-quantization-range' below {self.modulus_range // sampled}")

    def stage_config(self, num_sampled: int) -> dict:
        """The SETUP stage's ConfigRecord values (types as ``secaggplus_mod`` checks them)."""
        return {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: int(num_sampled),
            Key.SHARE_NUMBER: int(self.num_shares),
            Key.THRESHOLD: int(self.threshold),
            Key.CLIPPING_RANGE: float(self.clipping_range),
            Key.TARGET_RANGE: int(self.quantization_range),
            Key.MOD_RANGE: int(self.modulus_range),
            Key.MAX_WEIGHT: float(self.max_weight),
        }


def threshold_problem(num_shares: object, threshold: object) -> str | None:
    """Why a reconstruction threshold of ``threshold`` of ``num_shares`` shares is unsafe,
    or None. The client gate asks the same of the server's setup request."""
    if isinstance(num_shares, int) and isinstance(threshold, int) and 2 * threshold <= num_shares:
        return (f"Run config 'secagg-reconstruction-threshold' = {threshold} must exceed half "
                f"of 'secagg-num-shares' = {num_shares} (at least {num_shares // 2 + 1}): with "
                f"half the shares or fewer, a server that tells some neighbours a node "
                f"dropped and others that it did not can collect both its mask-seed shares "
                f"and its pairwise-key shares, i.e. its individual update")
    return None


AUTO_MAX_SHARES = 5  # "auto": a neighbourhood of up to 5 (SecAgg+'s k; Bell et al. use O(log n))


def auto_shares(shares: int | str, threshold: int | str, sampled: int | None) -> tuple[int, int]:
    """``secagg-num-shares`` and ``secagg-reconstruction-threshold`` with "auto" resolved
    for rounds of ``sampled`` clients (None: not known yet, taken as large): shares = the
    largest odd number <= min(5, sampled), at least 3 (below 3 clients SecAgg+ cannot
    run: check_sampled says so); threshold = shares // 2 + 1, the fewest shares above
    half (the rule that keeps a node's two secrets apart: threshold_problem), which lets
    the most neighbours drop."""
    if shares == "auto":
        most = AUTO_MAX_SHARES if sampled is None else min(AUTO_MAX_SHARES, sampled)
        shares = max(3, most if most % 2 else most - 1)
    if threshold == "auto":
        threshold = int(shares) // 2 + 1 if isinstance(shares, int) else threshold
    return shares, threshold


def settings_problems(s: SecAggSettings) -> list[str]:
    """What is wrong with ``s``, as messages naming the run-config key (empty if fine)."""
    out = []
    if not isinstance(s.num_shares, int) or s.num_shares < 3 or s.num_shares % 2 == 0:
        out.append(f"Run config 'secagg-num-shares' must be an odd integer >= 3 (a node's "
                   f"neighbourhood is itself and k/2 nodes on each side; an even count "
                   f"crashes Flower's client mod); got {s.num_shares!r}")
    if not isinstance(s.threshold, int) or s.threshold < 2:
        out.append(f"Run config 'secagg-reconstruction-threshold' must be an integer >= 2; "
                   f"got {s.threshold!r}")
    elif isinstance(s.num_shares, int) and s.threshold >= s.num_shares:
        out.append(f"Run config 'secagg-reconstruction-threshold' = {s.threshold} must be "
                   f"below 'secagg-num-shares' = {s.num_shares} (up to num-shares - "
                   f"threshold clients of a neighbourhood may drop)")
    elif problem := threshold_problem(s.num_shares, s.threshold):
        out.append(problem)
    if not isinstance(s.clipping_range, (int, float)) or not 0 < s.clipping_range < float("inf"):
        out.append(f"Run config 'secagg-clipping-range' must be a number > 0; got "
                   f"{s.clipping_range!r}")
    if (not isinstance(s.quantization_range, int) or isinstance(s.quantization_range, bool)
            or not 1 < s.quantization_range < s.modulus_range):
        out.append(f"Run config 'secagg-quantization-range' must be an integer in (1, 2^32); "
                   f"got {s.quantization_range!r}")
    if not isinstance(s.max_weight, (int, float)) or not 0 < s.max_weight < float("inf"):
        out.append(f"Run config 'secagg-max-weight' must be a number > 0 or \"auto\"; got "
                   f"{s.max_weight!r}")
    if not isinstance(s.timeout, (int, float)) or not 0 < s.timeout < float("inf"):
        out.append(f"Run config 'secagg-timeout' must be a number of seconds > 0; got "
                   f"{s.timeout!r}")
    return out


# ------------------------------------------------------------------ pure protocol math
def neighbourhoods(node_ids: Iterable[int], num_shares: int,
                   rng: random.Random) -> dict[int, set[int]]:
    """SecAgg+'s communication graph: shuffle the nodes onto a ring; node i's neighbours
    are the ring offsets -k/2 .. +k/2 (itself included), k + 1 = ``num_shares``."""
    ring = sorted(node_ids)
    rng.shuffle(ring)
    half = num_shares // 2
    m = len(ring)
    return {nid: {ring[(i + off) % m] for off in range(-half, half + 1)}
            for i, nid in enumerate(ring)}


def enough_neighbours(graph: dict[int, set[int]], alive: set[int], threshold: int,
                      nodes: Iterable[int]) -> bool:
    """Every node in ``nodes`` keeps >= ``threshold`` live neighbours (itself included)."""
    return all(len(graph[nid] & alive) >= threshold for nid in nodes)


def unmask(masked_sum: ArrayList, *, graph: dict[int, set[int]], in_sum: set[int],
           dropped: set[int], seeds: dict[int, bytes], sk1: dict[int, bytes],
           public_keys: dict[int, list[bytes]], modulus: int) -> ArrayList:
    """Remove the masks from the sum of the vectors of ``in_sum``.

    ``seeds``: the reconstructed private-mask seed b_i of every node in ``in_sum``;
    ``sk1``: the reconstructed pairwise-mask key of every node in ``dropped`` (they
    shared keys, so their neighbours in ``in_sum`` masked with them, but their own
    vectors are not in the sum). Node a adds the mask it shares with b if a > b, else
    subtracts it (``secaggplus_mod``): for a dropped d, each neighbour j in the sum added
    +mask if j > d, so it is subtracted here, and added back if j < d. Masks are
    expanded with ``secagg_prg.mask_arrays``, as the clients' (patched) mod does.
    """
    shapes = [a.shape for a in masked_sum]
    out = masked_sum
    for nid in sorted(in_sum):
        out = parameters_subtraction(out, mask_arrays(seeds[nid], modulus, shapes))
    for dead in sorted(dropped):
        for nid in sorted((graph[dead] & in_sum) - {dead}):
            key = generate_shared_key(bytes_to_private_key(sk1[dead]),
                                      bytes_to_public_key(public_keys[nid][0]))
            mask = mask_arrays(key, modulus, shapes)
            out = (parameters_subtraction(out, mask) if nid > dead
                   else parameters_addition(out, mask))
    return parameters_mod(out, modulus)


def out_of_range(unmasked: ArrayList, *, num_in_sum: int, quantization_range: int,
                 names: list[str]) -> str | None:
    """Why the unmasked sum cannot be the sum of ``num_in_sum`` honest uploads, or None.

    Each honest client's quantized value lies in [0, T] (its weighted value clipped to
    +-c), so every coordinate of the sum lies in [0, m T]; element 0 (the weight sum) is
    checked against the plaintext weights elsewhere. A client that adds anything to its
    masked upload (which is uniform mod 2^32, so nothing shows before unmasking) moves
    the sum by that amount: outside this range the round is rejected.
    """
    top = num_in_sum * quantization_range
    for name, values in zip(names, unmasked[1:]):
        over = int(np.count_nonzero(values > top))
        if over:
            return (f"the unmasked sum is outside what {num_in_sum} clients clipped to the "
                    f"clipping range can produce: {over} value(s) of '{name}' above "
                    f"{num_in_sum} x {quantization_range} (largest {int(values.max())}); a "
                    f"client uploaded values outside the protocol's range")
    return None


def weighted_mean(unmasked: ArrayList, *, num_in_sum: int, clipping_range: float,
                  quantization_range: int) -> tuple[ArrayList, int]:
    """(sum_i r_i v_i / sum_i r_i per array, sum_i r_i) from the unmasked integer sum
    whose element 0 is sum_i r_i (Flower's ``factor_combine`` layout)."""
    total_ratio, vectors = factor_extract(unmasked)
    total_ratio = int(total_ratio)
    if total_ratio <= 0:
        raise ValueError("the unmasked weight sum is 0: no contribution survived")
    values = dequantize(vectors, clipping_range, quantization_range)
    # Each client's dequantized value carries a +clipping_range shift; the sum carries
    # m of them, dequantize removed one.
    offset = -(num_in_sum - 1) * clipping_range
    scale = quantization_range / total_ratio
    return [(v + offset) * scale for v in values], total_ratio


def quantized_weight(num_examples: float, max_weight: float, quantization_range: int) -> int:
    """r_i as ``secaggplus_mod`` computes it from a client's num-examples."""
    return round(num_examples / max_weight * quantization_range)


# ------------------------------------------------------------------ metrics inside the sum
def summed_metrics(metrics: Mapping[str, object], *, clipped: bool, num_examples: float,
                   max_weight: float, clipping_range: float, quantization_range: int
                   ) -> np.ndarray:
    """The array a client appends to its upload (``SUMMED_SIZE`` values, float64).

    The mod multiplies every uploaded value by r_i / T before quantizing, so the
    protocol computes sum_i (r_i/T) u_i. Entry 0 is the clipped flag divided by r_i / T
    (its sum is then the number of clients that clipped, times ``_FLAG`` c); then, per
    ``SUMMED_MEANS`` name, a present flag and the value (their sums give the
    num-examples-weighted share of clients that reported it and its weighted mean).
    """
    c = float(clipping_range)
    r = quantized_weight(num_examples, max_weight, quantization_range)
    out = [_FLAG * c * quantization_range / r if clipped and r > 0 else 0.0]
    for name, scale in SUMMED_MEANS.items():
        value = metrics.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out += [_FLAG * c, float(value) * scale * c]
        else:
            out += [0.0, 0.0]
    return np.asarray(out, dtype=np.float64)


def read_summed_metrics(mean: np.ndarray, *, total_ratio: int, num_in_sum: int,
                        clipping_range: float, quantization_range: int) -> dict[str, float]:
    """The round's metrics from the weighted mean of the ``summed_metrics`` arrays.

    Each weighted mean is off by at most 2 c m / sum_i r_i (the quantization bound) in
    the array's units, i.e. that divided by scale x c in the metric's: it is reported
    rounded to the decimals this error leaves exact (so that a mean of flags that are
    all 1 reads 1.0, as in a plain round)."""
    c = float(clipping_range)
    out: dict[str, float] = {
        CLIPPED: int(round(float(mean[0]) * total_ratio / quantization_range / (_FLAG * c)))}
    error = 2 * c * num_in_sum / total_ratio
    for i, (name, scale) in enumerate(SUMMED_MEANS.items()):
        share = float(mean[1 + 2 * i]) / (_FLAG * c)  # weighted share that reported it
        if share > 1e-3:
            value = float(mean[2 + 2 * i]) / (scale * c) / share
            bound = error / (scale * c) / share * (1 + abs(value))
            # the finest decimal step whose half still covers the bound
            digits = max(0, math.floor(-math.log10(2 * bound))) if bound > 0 else 12
            out[name] = round(value, min(digits, 12))
    return out


# ------------------------------------------------------------------ Shamir, defensively
def combine_shares_sequential(share_list: list[bytes]) -> bytes:
    """Flower's ``combine_shares`` (flwr/common/secure_aggregation/crypto/shamir.py): the
    same share format (<4-byte index><16-byte chunk shares>), the same library calls
    (PyCryptodome's ``Shamir.combine`` per chunk, then ``unpad``), without the thread
    pool it starts for every secret (~4 ms of thread start-up per call here, against
    microseconds of work; ``reconstruct`` calls it k - t + 1 times per secret).
    ``tests/test_secagg_malicious.py`` checks that both give the same secrets."""
    chunk_num = (len(share_list[0]) - 4) >> 4
    chunks: list[list[tuple[int, bytes]]] = [[] for _ in range(chunk_num)]
    for share in share_list:
        index = int.from_bytes(share[:4], "little", signed=False)
        for i in range(chunk_num):
            start = (i << 4) + 4
            chunks[i].append((index, share[start:start + 16]))
    padded = b"".join(Shamir.combine(chunk, ssss=False) for chunk in chunks)
    try:
        return unpad(padded, 16)
    except ValueError:
        raise ValueError("Failed to combine shares") from None


def reconstruct(shares: list[tuple[int, bytes]], threshold: int, *,
                check: Callable[[bytes], bool] | None = None, verified: bool = False
                ) -> tuple[bytes, set[int]]:
    """(secret, senders of shares inconsistent with it) from (sender, share) pairs.

    Shares are combined as Flower's ``combine_shares`` does (``combine_shares_sequential``:
    PyCryptodome's ``Shamir.combine``). Consistency test: for a
    base B of ``threshold`` shares and another share e, e lies on B's polynomial iff the
    secret of B minus its first share plus e equals B's secret (two polynomials of
    degree t - 1 that agree on t - 1 points and at 0 are equal). A base is accepted when
    its secret passes ``check`` and, unless ``verified`` (``check`` proves the secret,
    e.g. a private key against its public key), at least (k + t) / 2 of the k shares
    agree with it: then no other polynomial can have as many (unique decoding: up to
    (k - t) / 2 wrong shares are corrected). Raises ``SecAggFailed`` otherwise.
    """
    shares = sorted(shares)
    k = len(shares)
    if k < threshold:
        raise SecAggFailed(f"{k} share(s), fewer than the threshold {threshold}")

    def combine(subset: tuple[int, ...]) -> bytes | None:
        try:
            return combine_shares_sequential([shares[i][1] for i in subset])
        except Exception:  # noqa: BLE001  (a wrong share: "Duplicate share", unpadding, ...)
            return None

    need = (k + threshold + 1) // 2
    for base in itertools.islice(itertools.combinations(range(k), threshold), MAX_DECODING_BASES):
        secret = combine(base)
        if secret is None or (check is not None and not check(secret)):
            continue
        agree = set(base)
        for i in range(k):
            if i not in agree and combine(base[1:] + (i,)) == secret:
                agree.add(i)
        if verified or len(agree) >= need:
            return secret, {shares[i][0] for i in range(k) if i not in agree}
    raise SecAggFailed(f"the {k} shares do not determine a secret (more than "
                       f"{(k - threshold) // 2} of them wrong?)")


def _key_matches(public_key: bytes) -> Callable[[bytes], bool]:
    def check(secret: bytes) -> bool:
        try:
            return public_key_to_bytes(bytes_to_private_key(secret).public_key()) == public_key
        except Exception:  # noqa: BLE001  (not a key)
            return False
    return check


# ------------------------------------------------------------------ reply helpers
def is_secure_aggregate(message: Message) -> bool:
    return (not message.has_error()) and SECAGG_RECORD in message.content.config_records


def contributors(message: Message) -> list[int]:
    """The node ids whose contributions are in a reply: the reply's sender, or, for the
    one reply of a secure round, every node in the sum."""
    if is_secure_aggregate(message):
        return [int(n) for n in message.content.config_records[SECAGG_RECORD][NODES]]
    return [int(message.metadata.src_node_id)]


# ------------------------------------------------------------------ parsing the replies
class SecAggFailed(RuntimeError):
    """The protocol could not finish this round (too many dropouts, a bad upload)."""


class Malformed(ValueError):
    """One node's reply cannot be used: that node is a dropout for the round."""


def _configs(reply: Message) -> ConfigRecord:
    record = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    if not isinstance(record, ConfigRecord):
        raise Malformed(f"no '{RECORD_KEY_CONFIGS}' record")
    return record


def _list_of(record: ConfigRecord, key: str, kind: type) -> list:
    value = record.get(key)
    if not isinstance(value, list) or any(type(v) is not kind for v in value):
        raise Malformed(f"'{key}' is not a list of {kind.__name__}")
    return value


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Malformed(f"{what} = {value!r} is not a number")
    if not math.isfinite(value):
        raise Malformed(f"{what} = {value!r} is not finite")
    return float(value)


def read_setup(reply: Message) -> list[bytes]:
    """[pk1, pk2]: two distinct public keys on the mod's curve."""
    record = _configs(reply)
    keys = []
    for name in (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2):
        value = record.get(name)
        if not isinstance(value, bytes) or not 0 < len(value) <= MAX_KEY_BYTES:
            raise Malformed(f"'{name}' is missing or not a public key's bytes")
        try:
            key = bytes_to_public_key(value)
        except Exception as err:  # noqa: BLE001
            raise Malformed(f"'{name}' does not parse as a public key ({err})") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != KEY_CURVE:
            raise Malformed(f"'{name}' is not a {KEY_CURVE} key")
        keys.append(value)
    if keys[0] == keys[1]:
        raise Malformed("pk1 = pk2")
    return keys


def read_share_keys(reply: Message, expected: set[int]) -> dict[int, bytes]:
    """destination -> ciphertext, exactly one for each neighbour it was sent keys of."""
    record = _configs(reply)
    dsts = _list_of(record, Key.DESTINATION_LIST, int)
    ctxts = _list_of(record, Key.CIPHERTEXT_LIST, bytes)
    if len(dsts) != len(ctxts):
        raise Malformed(f"{len(dsts)} destinations but {len(ctxts)} ciphertexts")
    if len(set(dsts)) != len(dsts) or set(dsts) != expected:
        raise Malformed(f"destinations {sorted(dsts)} are not its neighbours {sorted(expected)}")
    if any(not 0 < len(c) <= MAX_SHARE_BYTES * 4 for c in ctxts):
        raise Malformed("a ciphertext is empty or too long")
    return dict(zip(dsts, ctxts))


def read_upload(reply: Message, shapes: list[tuple[int, ...]], s: SecAggSettings
                ) -> tuple[ArrayList, dict]:
    """(masked vector as int64, plaintext info) of one collect-stage reply."""
    record = _configs(reply)
    blobs = _list_of(record, Key.MASKED_PARAMETERS, bytes)
    if len(blobs) != len(shapes):
        raise Malformed(f"{len(blobs)} masked arrays, expected {len(shapes)}")
    vector = []
    for i, (blob, shape) in enumerate(zip(blobs, shapes)):
        try:
            a = bytes_to_ndarray(blob)
        except Exception as err:  # noqa: BLE001
            raise Malformed(f"masked array {i} does not parse ({err})") from None
        if a.shape != shape:
            raise Malformed(f"masked array {i} has shape {a.shape}, expected {shape}")
        if not np.issubdtype(a.dtype, np.integer):
            raise Malformed(f"masked array {i} has dtype {a.dtype}, not an integer type")
        if a.size and (int(a.min()) < 0 or int(a.max()) >= s.modulus_range):
            raise Malformed(f"masked array {i} has values outside [0, {s.modulus_range})")
        vector.append(a.astype(np.int64))
    examples = reply.content.metric_records.get("fitres.num_examples")
    if examples is None or "num_examples" not in examples:
        raise Malformed("no num-examples")
    n = _number(examples["num_examples"], "num-examples")
    if not 0 < n <= s.max_weight:
        raise Malformed(f"num-examples {n:g} is not in (0, secagg-max-weight = {s.max_weight:g}]")
    metrics = reply.content.config_records.get("fitres.metrics") or {}
    plain = {}
    for name, value in metrics.items():  # only PLAINTEXT_METRICS are used; none may be bad
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
            raise Malformed(f"plaintext metric '{name}' = {value!r} is not finite")
        if name in PLAINTEXT_METRICS:
            plain[name] = _number(value, f"'{name}'")
            if plain[name] < 0:
                raise Malformed(f"'{name}' = {value!r} is negative")
    return vector, {"num-examples": n, "metrics": plain, "bytes": sum(len(b) for b in blobs)}


def read_unmask(reply: Message, expected: set[int]) -> dict[int, bytes]:
    """owner -> share, exactly one for each node it was asked about."""
    record = _configs(reply)
    nids = _list_of(record, Key.NODE_ID_LIST, int)
    shares = _list_of(record, Key.SHARE_LIST, bytes)
    if len(nids) != len(shares):
        raise Malformed(f"{len(nids)} node ids but {len(shares)} shares")
    if len(set(nids)) != len(nids) or set(nids) != expected:
        raise Malformed(f"shares for {sorted(nids)}, asked for {sorted(expected)}")
    if any(len(b) < 20 or (len(b) - 4) % 16 or len(b) > MAX_SHARE_BYTES for b in shares):
        raise Malformed("a share is not <4-byte index><16-byte chunks>")
    if len(set(shares)) != len(shares):
        raise Malformed("the same share for different nodes")
    return dict(zip(nids, shares))


# ------------------------------------------------------------------ the grid wrapper
class SecureAggregationGrid(DelegatingGrid):
    """A ``Grid`` that runs every train ``send_and_receive`` as a SecAgg+ round.

    ``reply_spec(arrays)`` gives the key -> (shape, dtype) layout of one client's reply
    for a train message carrying model ``arrays`` (the strategy's ``reply_array_spec``,
    or the model's own layout). ``rng`` shuffles the communication graph.
    """

    def __init__(self, grid: Grid, settings: SecAggSettings,
                 reply_spec: Callable[[ArrayRecord], dict[str, ArraySpec]],
                 rng: random.Random | None = None) -> None:
        super().__init__(grid)
        self.settings = settings.check()
        self.reply_spec = reply_spec
        self.rng = rng or random.SystemRandom()

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return self.grid.send_and_receive(messages, timeout=timeout)
        try:
            return [self._secure_round(messages)]
        except SecAggFailed as err:
            log(WARNING, "SecAgg+ round failed: %s; the round aggregates nothing", err)
            return [Message(error=Error(code=SECAGG_ERROR_CODE,
                                        reason=f"secure aggregation failed: {err}"),
                            reply_to=messages[0])]

    # ---- the protocol
    def _exchange(self, stage: str, requests: dict[int, RecordDict], group: str
                  ) -> dict[int, Message]:
        """Send one message per node, return the non-error replies by node id."""
        out = [Message(content=content, dst_node_id=nid, message_type=MessageType.TRAIN,
                       group_id=group) for nid, content in requests.items()]
        replies = self.grid.send_and_receive(out, timeout=self.settings.timeout)
        ok = {}
        for reply in replies:
            try:
                nid = int(reply.metadata.src_node_id)
            except Exception:  # noqa: BLE001
                continue
            if nid not in requests or nid in ok:
                continue  # not asked, or a second reply: only the first one counts
            if reply.has_error():
                log(WARNING, "SecAgg+ %s: node %s dropped (%s)", stage, nid, reply.error.reason)
            else:
                ok[nid] = reply
        return ok

    def _parse(self, stage: str, replies: dict[int, Message],
               read: Callable[[int, Message], object], refused: dict[int, str]) -> dict:
        """``read`` every reply; a reply it cannot read makes its node a dropout."""
        out = {}
        for nid, reply in replies.items():
            try:
                out[nid] = read(nid, reply)
            except Exception as err:  # noqa: BLE001  (malformed in any way: never a crash)
                reason = str(err) if isinstance(err, Malformed) else f"{type(err).__name__}: {err}"
                self._refuse(stage, nid, reason, refused)
        return out

    @staticmethod
    def _refuse(stage: str, nid: int, reason: str, refused: dict[int, str]) -> None:
        log(WARNING, "SecAgg+ %s: node %s's reply refused (%s); it counts as a dropout",
            stage, nid, reason)
        refused.setdefault(nid, f"{stage}: {reason}")

    def _secure_round(self, messages: list[Message]) -> Message:
        s = self.settings
        train = {int(m.metadata.dst_node_id): m for m in messages}
        sampled = set(train)
        group = messages[0].metadata.group_id
        refused: dict[int, str] = {}  # node -> why its reply was refused (stage: reason)
        if len(sampled) < s.num_shares:
            raise SecAggFailed(f"{len(sampled)} nodes sampled, fewer than secagg-num-shares "
                               f"= {s.num_shares}")
        graph = neighbourhoods(sampled, s.num_shares, self.rng)

        def need(alive: set[int], stage: str, nodes: Iterable[int]) -> None:
            if len(alive) < s.threshold or not enough_neighbours(graph, alive, s.threshold,
                                                                   nodes):
                raise SecAggFailed(f"after {stage}, a node has fewer than the threshold "
                                   f"{s.threshold} live neighbours ({len(alive)} of "
                                   f"{len(sampled)} nodes left)")

        # Stage 0, setup: every node makes two key pairs and sends the public halves.
        setup = s.stage_config(len(sampled))
        replies = self._exchange(Stage.SETUP, {
            nid: RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(dict(setup))}) for nid in sampled
        }, group)
        public_keys = self._parse(Stage.SETUP, replies, lambda _, r: read_setup(r), refused)
        holders: dict[bytes, list[int]] = {}
        for nid, keys in public_keys.items():
            for key in keys:
                holders.setdefault(key, []).append(nid)
        for key, nids in holders.items():  # a replayed key would crash the neighbours' mods
            if len(nids) > 1:
                for nid in nids:
                    self._refuse(Stage.SETUP, nid, f"its public key is also node(s) "
                                 f"{sorted(set(nids) - {nid})}'s", refused)
        public_keys = {n: k for n, k in public_keys.items() if n not in refused}
        alive = set(public_keys)
        need(alive, "setup", alive)

        # Stage 1, share keys: forward the neighbours' public keys; collect the encrypted
        # Shamir shares of each node's b_i and sk1_i, addressed to its neighbours.
        def share_request(nid: int) -> RecordDict:
            record = ConfigRecord({str(j): public_keys[j] for j in graph[nid] & alive})
            record[Key.STAGE] = Stage.SHARE_KEYS
            return RecordDict({RECORD_KEY_CONFIGS: record})

        replies = self._exchange(Stage.SHARE_KEYS, {nid: share_request(nid) for nid in alive},
                                 group)
        sent = self._parse(Stage.SHARE_KEYS, replies,
                           lambda nid, r: read_share_keys(r, (graph[nid] & alive) - {nid}),
                           refused)
        shared = set(sent)  # these nodes' shares exist: their masks can be removed
        need(shared, "share-keys", shared)
        forward: dict[int, tuple[list[int], list[bytes]]] = {nid: ([], []) for nid in shared}
        for src in sorted(shared):
            for dst, ctxt in sent[src].items():
                if dst in forward:
                    forward[dst][0].append(src)
                    forward[dst][1].append(ctxt)

        # Stage 2, collect masked vectors: each node trains (the original train message)
        # and uploads its masked, weighted, quantized reply.
        def collect_request(nid: int) -> RecordDict:
            content = RecordDict(dict(train[nid].content.items()))  # per node: a copy
            content[RECORD_KEY_CONFIGS] = ConfigRecord({
                Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                Key.CIPHERTEXT_LIST: forward[nid][1],
                Key.SOURCE_LIST: forward[nid][0],
            })
            return content

        replies = self._exchange(Stage.COLLECT_MASKED_VECTORS,
                                 {nid: collect_request(nid) for nid in shared}, group)
        template = next(iter(train.values())).content[wire.ARRAYS]
        spec = self.reply_spec(template)
        keys = sorted(spec)
        shapes = [(1,)] + [spec[k].shape for k in keys] + [(SUMMED_SIZE,)]
        uploads = self._parse(Stage.COLLECT_MASKED_VECTORS, replies,
                              lambda _, r: read_upload(r, shapes, s), refused)
        vectors = {nid: u[0] for nid, u in uploads.items()}
        plain = {nid: u[1] for nid, u in uploads.items()}
        in_sum = set(vectors)
        dropped = shared - in_sum
        need(in_sum, "collect", in_sum)

        # Stage 3, unmask: ask the nodes in the sum for the shares of b_i of every node in
        # the sum and of sk1_d of every dropped node d, per neighbourhood.
        def unmask_request(nid: int) -> RecordDict:
            return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({
                Key.STAGE: Stage.UNMASK,
                Key.ACTIVE_NODE_ID_LIST: sorted(graph[nid] & in_sum),
                Key.DEAD_NODE_ID_LIST: sorted(graph[nid] & dropped),
            })})

        replies = self._exchange(Stage.UNMASK, {nid: unmask_request(nid) for nid in in_sum},
                                 group)
        answered = self._parse(Stage.UNMASK, replies,
                               lambda nid, r: read_unmask(r, graph[nid] & (in_sum | dropped)),
                               refused)
        try:
            unmasked, secret_problems = self._unmask(graph, in_sum, dropped, answered, vectors,
                                                     public_keys, shapes)
        except SecAggFailed:
            raise
        except Exception as err:  # noqa: BLE001  (anything in reconstruction: skip the round)
            raise SecAggFailed(f"unmasking failed: {type(err).__name__}: {err}") from err
        for nid, reason in sorted(secret_problems.items()):
            self._refuse(Stage.UNMASK, nid, reason, refused)

        try:
            mean, summed = self._check_and_decode(unmasked, in_sum, plain, keys)
        except SecAggFailed:
            raise
        except Exception as err:  # noqa: BLE001
            raise SecAggFailed(f"decoding the unmasked sum failed: {type(err).__name__}: "
                               f"{err}") from err
        log(INFO, "SecAgg+: the sum of %d of %d sampled nodes unmasked (%d dropped, %d "
            "refused as malformed%s)", len(in_sum), len(sampled), len(sampled - in_sum),
            len(refused), f": {sorted(refused)}" if refused else "")
        return _aggregate_reply(train[min(in_sum)], mean[:-1], keys, spec, template, plain,
                                summed, in_sum, sampled - in_sum, refused)

    def _check_and_decode(self, unmasked: ArrayList, in_sum: set[int], plain: dict[int, dict],
                          keys: list[str]) -> tuple[ArrayList, dict[str, float]]:
        """The weighted mean (with the summed metrics' array last) and those metrics, once
        the unmasked sum passed the weight cross-check and the range check."""
        s = self.settings
        claimed = sum(quantized_weight(plain[n]["num-examples"], s.max_weight,
                                       s.quantization_range) for n in in_sum)
        if int(unmasked[0][0]) != claimed:  # someone's masked weight is not its claim
            raise SecAggFailed(f"the unmasked weight sum {int(unmasked[0][0])} differs from "
                               f"the {claimed} the clients' plaintext num-examples imply")
        problem = out_of_range(unmasked, num_in_sum=len(in_sum),
                               quantization_range=s.quantization_range,
                               names=[*keys, "secagg-metrics"])
        if problem:
            raise SecAggFailed(problem)
        mean, total_ratio = weighted_mean(unmasked, num_in_sum=len(in_sum),
                                          clipping_range=s.clipping_range,
                                          quantization_range=s.quantization_range)
        summed = read_summed_metrics(mean[-1], total_ratio=total_ratio,
                                     num_in_sum=len(in_sum), clipping_range=s.clipping_range,
                                     quantization_range=s.quantization_range)
        return mean, summed

    def _unmask(self, graph: dict[int, set[int]], in_sum: set[int], dropped: set[int],
                answered: dict[int, dict[int, bytes]], vectors: dict[int, ArrayList],
                public_keys: dict[int, list[bytes]], shapes: list[tuple[int, ...]]
                ) -> tuple[ArrayList, dict[int, str]]:
        """The unmasked sum of ``in_sum``'s vectors, and the nodes whose shares were wrong."""
        s = self.settings
        shares: dict[int, list[tuple[int, bytes]]] = {nid: [] for nid in in_sum | dropped}
        for sender, owned in answered.items():
            for owner, share in owned.items():
                shares[owner].append((sender, share))
        wrong: dict[int, str] = {}
        secrets = {}
        for owner in sorted(shares):
            dead = owner in dropped
            try:
                secret, bad = reconstruct(
                    shares[owner], s.threshold,
                    check=_key_matches(public_keys[owner][0]) if dead else (lambda b: len(b) == 32),
                    verified=dead)
            except SecAggFailed as err:
                raise SecAggFailed(f"unmask: node {owner}'s {'pairwise-mask key' if dead else 'mask seed'}"
                                   f" cannot be rebuilt: {err} ({len(answered)} of "
                                   f"{len(in_sum)} nodes answered)") from None
            secrets[owner] = secret
            for sender in bad:
                wrong.setdefault(sender, f"its share of node {owner}'s secret is wrong")
        masked = [np.zeros(shape, dtype=np.int64) for shape in shapes]
        for nid in sorted(in_sum):
            masked = parameters_addition(masked, vectors[nid])
        masked = parameters_mod(masked, s.modulus_range)
        unmasked = unmask(masked, graph=graph, in_sum=in_sum, dropped=dropped,
                          seeds={n: secrets[n] for n in in_sum},
                          sk1={n: secrets[n] for n in dropped},
                          public_keys=public_keys, modulus=s.modulus_range)
        return unmasked, wrong


def _aggregate_reply(origin: Message, mean: ArrayList, keys: list[str],
                     spec: dict[str, ArraySpec], template: ArrayRecord, plain: dict[int, dict],
                     summed: dict[str, float], in_sum: set[int], dropped: set[int],
                     refused: dict[int, str]) -> Message:
    """The one reply the strategy sees: the weighted mean (model keys: x + mean update),
    num-examples = sum n_i, the metrics summed inside the protocol."""
    by_key = dict(zip(keys, mean))
    arrays = ArrayRecord()
    for key, want in spec.items():  # the strategy's own key order
        value = by_key[key]
        if key in template:
            value = template[key].numpy().astype(np.float64) + value
        arrays[key] = Array(np.ascontiguousarray(value.astype(want.dtype).reshape(want.shape)))
    total = sum(plain[n]["num-examples"] for n in in_sum)
    metrics = MetricRecord({wire.NUM_EXAMPLES: total})
    for name, value in summed.items():
        metrics[name] = value
    metrics[wire.UPLOAD_BYTES] = int(sum(plain[n]["bytes"] for n in in_sum) / len(in_sum))
    metrics[SURVIVORS] = len(in_sum)
    metrics[DROPOUTS] = len(dropped)
    metrics[MALFORMED] = len(refused)
    info = ConfigRecord({NODES: sorted(in_sum), DROPPED: sorted(dropped),
                         MALFORMED_NODES: sorted(refused)})
    spends = [plain[n]["metrics"][wire.DP_EPSILON] for n in sorted(in_sum)
              if wire.DP_EPSILON in plain[n]["metrics"]]
    if spends:
        info[DP_EPSILONS] = spends
    content = RecordDict({wire.ARRAYS: arrays, wire.METRICS: metrics, SECAGG_RECORD: info})
    return Message(content, reply_to=origin)
