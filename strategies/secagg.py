"""SecAgg+ for the app's Message-API strategies: the server sees only the weighted sum.

Bell, Bonawitz, Gascon, Lepoint, Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", ACM CCS 2020 (SecAgg+), building on Bonawitz et al.,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", ACM CCS 2017.

What the protocol computes. Client i holds a vector v_i and a weight n_i (its
``num-examples``). It uploads Q(r_i * v_i) and the integer r_i = round(T n_i / W)
(T = ``quantization_range``, W = ``max_weight``, Q = stochastic quantization of values
clipped to +-``clipping_range``), masked with a private mask (seed b_i) and pairwise
masks shared with its neighbours in a random k-regular graph (k + 1 = ``num_shares``).
The masks cancel in the sum mod ``modulus_range``; the server reconstructs, from at least
``threshold`` Shamir shares each, b_i of every client whose vector is in the sum and the
pairwise-mask key sk1_d of every client d that shared keys but dropped before its vector
arrived. What it learns is

    sum_i r_i * v_i  and  sum_i r_i,   hence the weighted mean  sum_i r_i v_i / sum_i r_i,

which equals the num-examples-weighted mean up to quantization (bound below). Every
strategy whose aggregate is a function of that weighted mean (FedAvg and the
server-optimizer family, ``LINEAR``) and SCAFFOLD (whose two updates are
sums, see ``strategies/scaffold.py``) gets exactly its usual input: one reply holding
the weighted mean and ``num-examples`` = sum_i n_i. The strategies do not change.

What travels. The client uploads its *update*, v_i = y_i - x for the model keys (x: the
arrays it was sent) and its other reply arrays as they are (SCAFFOLD's Delta c_i), in
sorted key order (``fl_app/secagg_client.py``); the server adds x back. Updates are
small, so clipping rarely bites and the quantization error is relative to the update.
Per-client ``num-examples`` and metrics travel in plaintext, as in Flower's own
``SecAggPlusWorkflow``.

Error bound (per coordinate, from Flower's ``quantize``: stochastic rounding to a grid of
step 2c/T): |mean_secure - mean_r| <= m * (2c/T) / sum_i (r_i/T) for the m surviving
clients, where mean_r is the mean with the quantized weights r_i/T; the weights
themselves differ from n_i/W by at most 1/(2T) each. ``tests/test_secagg.py`` checks
the result against the plain aggregate within this bound.

Building blocks: Flower's ``secaggplus_mod`` on the client (unchanged) and
``flwr.common.secure_aggregation`` (Shamir shares, key agreement, PRG masks,
quantization) on the server. This module is the server half of the protocol for the
Message API: Flower 1.42 has it only for the legacy strategy API (``SecAggPlusWorkflow``,
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

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.serverapp import Grid
from flwr.supercore import log
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fl_app import wire

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
DP_EPSILONS = "dp-epsilon"  # the contributors' plaintext DP spends (fl_app/privacy.py)
SECAGG_ERROR_CODE = 4272  # error code of the reply of a round whose protocol failed
MODULUS_RANGE = 2**32  # Flower's default; the sum of m values < T must stay below it
# Round metrics of a secure round (in the one reply's MetricRecord)
SURVIVORS = "secagg-survivors"
DROPOUTS = "secagg-dropouts"
SECAGG_FAILED = "secagg-failed"  # 1 in a round whose protocol failed (Guarded's stats)
CLIPPED = "secagg-clipped"  # values a client's clipping range cut (fl_app/secagg_client.py)

NDArrays = list[np.ndarray]


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
        if self.num_shares > sampled:
            raise ValueError(
                f"Run config 'secagg-num-shares' = {self.num_shares} exceeds the {sampled} "
                f"clients sampled per round: each client's secrets are split into one share "
                f"per neighbour (itself included). Set 'secagg-num-shares' to an odd number "
                f"<= {sampled}, or sample more clients ('fraction-train', 'min-train-nodes')")
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


def unmask(masked_sum: NDArrays, *, graph: dict[int, set[int]], in_sum: set[int],
           dropped: set[int], seeds: dict[int, bytes], sk1: dict[int, bytes],
           public_keys: dict[int, list[bytes]], modulus: int) -> NDArrays:
    """Remove the masks from the sum of the vectors of ``in_sum``.

    ``seeds``: the reconstructed private-mask seed b_i of every node in ``in_sum``;
    ``sk1``: the reconstructed pairwise-mask key of every node in ``dropped`` (they
    shared keys, so their neighbours in ``in_sum`` masked with them, but their own
    vectors are not in the sum). Node a adds the mask it shares with b if a > b, else
    subtracts it (``secaggplus_mod``): for a dropped d, each neighbour j in the sum added
    +mask if j > d, so it is subtracted here, and added back if j < d.
    """
    shapes = [a.shape for a in masked_sum]
    out = masked_sum
    for nid in sorted(in_sum):
        out = parameters_subtraction(out, pseudo_rand_gen(seeds[nid], modulus, shapes))
    for dead in sorted(dropped):
        for nid in sorted((graph[dead] & in_sum) - {dead}):
            key = generate_shared_key(bytes_to_private_key(sk1[dead]),
                                      bytes_to_public_key(public_keys[nid][0]))
            mask = pseudo_rand_gen(key, modulus, shapes)
            out = (parameters_subtraction(out, mask) if nid > dead
                   else parameters_addition(out, mask))
    return parameters_mod(out, modulus)


def weighted_mean(unmasked: NDArrays, *, num_in_sum: int, clipping_range: float,
                  quantization_range: int) -> tuple[NDArrays, int]:
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


# ------------------------------------------------------------------ reply helpers
def is_secure_aggregate(message: Message) -> bool:
    return (not message.has_error()) and SECAGG_RECORD in message.content.config_records


def contributors(message: Message) -> list[int]:
    """The node ids whose contributions are in a reply: the reply's sender, or, for the
    one reply of a secure round, every node in the sum."""
    if is_secure_aggregate(message):
        return [int(n) for n in message.content.config_records[SECAGG_RECORD][NODES]]
    return [int(message.metadata.src_node_id)]


# ------------------------------------------------------------------ the grid wrapper
class SecAggFailed(RuntimeError):
    """The protocol could not finish this round (too many dropouts, a bad upload)."""


class SecureAggregationGrid(Grid):
    """A ``Grid`` that runs every train ``send_and_receive`` as a SecAgg+ round.

    ``reply_spec(arrays)`` gives the key -> (shape, dtype) layout of one client's reply
    for a train message carrying model ``arrays`` (the strategy's ``reply_array_spec``,
    or the model's own layout). ``rng`` shuffles the communication graph.
    """

    def __init__(self, grid: Grid, settings: SecAggSettings,
                 reply_spec: Callable[[ArrayRecord], dict[str, ArraySpec]],
                 rng: random.Random | None = None) -> None:
        self.grid = grid
        self.settings = settings.check()
        self.reply_spec = reply_spec
        self.rng = rng or random.SystemRandom()

    # ---- plain delegation
    def set_run(self, run) -> None:  # type: ignore[no-untyped-def]
        self.grid.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[no-untyped-def]
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):  # type: ignore[no-untyped-def]
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

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
            nid = int(reply.metadata.src_node_id)
            if reply.has_error():
                log(WARNING, "SecAgg+ %s: node %s dropped (%s)", stage, nid, reply.error.reason)
            elif nid in requests:
                ok[nid] = reply
        return ok

    def _secure_round(self, messages: list[Message]) -> Message:
        s = self.settings
        train = {int(m.metadata.dst_node_id): m for m in messages}
        sampled = set(train)
        group = messages[0].metadata.group_id
        if len(sampled) < s.num_shares:
            raise SecAggFailed(f"{len(sampled)} nodes sampled, fewer than secagg-num-shares "
                               f"= {s.num_shares}")
        graph = neighbourhoods(sampled, s.num_shares, self.rng)

        def need(alive: set[int], stage: str, nodes: Iterable[int]) -> None:
            if not enough_neighbours(graph, alive, s.threshold, nodes):
                raise SecAggFailed(f"after {stage}, a node has fewer than the threshold "
                                   f"{s.threshold} live neighbours ({len(alive)} of "
                                   f"{len(sampled)} nodes left)")

        # Stage 0, setup: every node makes two key pairs and sends the public halves.
        setup = s.stage_config(len(sampled))
        replies = self._exchange(Stage.SETUP, {
            nid: RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(dict(setup))}) for nid in sampled
        }, group)
        public_keys = {nid: [r.content.config_records[RECORD_KEY_CONFIGS][Key.PUBLIC_KEY_1],
                             r.content.config_records[RECORD_KEY_CONFIGS][Key.PUBLIC_KEY_2]]
                       for nid, r in replies.items()}
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
        shared = set(replies)  # these nodes' shares exist: their masks can be removed
        need(shared, "share-keys", shared)
        forward: dict[int, tuple[list[int], list[bytes]]] = {nid: ([], []) for nid in shared}
        for src, reply in replies.items():
            record = reply.content.config_records[RECORD_KEY_CONFIGS]
            for dst, ctxt in zip(record[Key.DESTINATION_LIST], record[Key.CIPHERTEXT_LIST],
                                 strict=True):
                if int(dst) in forward:
                    forward[int(dst)][0].append(src)
                    forward[int(dst)][1].append(ctxt)

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
        shapes = [(1,)] + [spec[k].shape for k in keys]
        vectors: dict[int, NDArrays] = {}
        plain: dict[int, dict] = {}
        for nid, reply in replies.items():
            problem, vector, info = _read_upload(reply, shapes, s)
            if problem:  # left out: its masks are removed as for a dropped node
                log(WARNING, "SecAgg+ collect: node %s's upload left out: %s", nid, problem)
                continue
            vectors[nid], plain[nid] = vector, info
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
        shares: dict[int, list[bytes]] = {nid: [] for nid in in_sum | dropped}
        for reply in replies.values():
            record = reply.content.config_records[RECORD_KEY_CONFIGS]
            for owner, share in zip(record[Key.NODE_ID_LIST], record[Key.SHARE_LIST],
                                    strict=True):
                if int(owner) in shares:
                    shares[int(owner)].append(share)
        short = sorted(nid for nid, got in shares.items() if len(got) < s.threshold)
        if short:
            raise SecAggFailed(f"unmask: fewer than {s.threshold} shares for node(s) {short} "
                               f"({len(replies)} of {len(in_sum)} nodes answered)")
        secrets = {nid: combine_shares(got) for nid, got in shares.items()}
        masked = [np.zeros(shape, dtype=np.int64) for shape in shapes]
        for nid in sorted(in_sum):
            masked = parameters_addition(masked, vectors[nid])
        masked = parameters_mod(masked, s.modulus_range)
        unmasked = unmask(masked, graph=graph, in_sum=in_sum, dropped=dropped,
                          seeds={n: secrets[n] for n in in_sum},
                          sk1={n: secrets[n] for n in dropped},
                          public_keys=public_keys, modulus=s.modulus_range)
        mean, total_ratio = weighted_mean(unmasked, num_in_sum=len(in_sum),
                                          clipping_range=s.clipping_range,
                                          quantization_range=s.quantization_range)
        claimed = sum(quantized_weight(plain[n]["num-examples"], s.max_weight,
                                       s.quantization_range) for n in in_sum)
        if claimed != total_ratio:  # someone's masked weight is not its plaintext claim
            raise SecAggFailed(f"the unmasked weight sum {total_ratio} differs from the "
                               f"{claimed} the clients' plaintext num-examples imply")
        log(INFO, "SecAgg+: the sum of %d of %d sampled nodes unmasked (%d dropped)",
            len(in_sum), len(sampled), len(sampled - in_sum))
        return _aggregate_reply(train[min(in_sum)], mean, keys, spec, template, plain,
                                in_sum, sampled - in_sum)


def _read_upload(reply: Message, shapes: list[tuple[int, ...]], s: SecAggSettings
                 ) -> tuple[str | None, NDArrays, dict]:
    """(problem, masked vector, plaintext info) of one collect-stage reply."""
    try:
        record = reply.content.config_records[RECORD_KEY_CONFIGS]
        vector = [bytes_to_ndarray(b).astype(np.int64) for b in record[Key.MASKED_PARAMETERS]]
        n = float(reply.content.metric_records["fitres.num_examples"]["num_examples"])
        metrics = dict(reply.content.config_records["fitres.metrics"])
    except (KeyError, ValueError, TypeError) as err:
        return f"malformed upload ({err!r})", [], {}
    if [a.shape for a in vector] != shapes:
        return (f"vector layout {[a.shape for a in vector][:3]}... differs from the "
                f"expected {shapes[:3]}..."), [], {}
    if not 0 < n <= s.max_weight:
        return f"num-examples {n:g} is not in (0, secagg-max-weight = {s.max_weight:g}]", [], {}
    nbytes = sum(len(b) for b in record[Key.MASKED_PARAMETERS])
    return None, vector, {"num-examples": n, "metrics": metrics, "bytes": nbytes}


def _aggregate_reply(origin: Message, mean: NDArrays, keys: list[str],
                     spec: dict[str, ArraySpec], template: ArrayRecord, plain: dict[int, dict],
                     in_sum: set[int], dropped: set[int]) -> Message:
    """The one reply the strategy sees: the weighted mean (model keys: x + mean update),
    num-examples = sum n_i, plaintext metrics averaged as FedAvg would."""
    by_key = dict(zip(keys, mean))
    arrays = ArrayRecord()
    for key, want in spec.items():  # the strategy's own key order
        value = by_key[key]
        if key in template:
            value = template[key].numpy().astype(np.float64) + value
        arrays[key] = Array(np.ascontiguousarray(value.astype(want.dtype).reshape(want.shape)))
    total = sum(plain[n]["num-examples"] for n in in_sum)
    metrics = MetricRecord({wire.NUM_EXAMPLES: total})
    names = set.intersection(*(set(plain[n]["metrics"]) for n in in_sum))
    for name in sorted(names):
        values = [plain[n]["metrics"][name] for n in sorted(in_sum)]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            if name == CLIPPED:
                metrics[name] = int(sum(values))
            else:
                metrics[name] = sum(plain[n]["num-examples"] * float(v)
                                    for n, v in zip(sorted(in_sum), values)) / total
    metrics[wire.UPLOAD_BYTES] = int(sum(plain[n]["bytes"] for n in in_sum) / len(in_sum))
    metrics[SURVIVORS] = len(in_sum)
    metrics[DROPOUTS] = len(dropped)
    info = ConfigRecord({NODES: sorted(in_sum), DROPPED: sorted(dropped)})
    spends = [float(plain[n]["metrics"][wire.DP_EPSILON]) for n in sorted(in_sum)
              if wire.DP_EPSILON in plain[n]["metrics"]]
    if spends:
        info[DP_EPSILONS] = spends
    content = RecordDict({wire.ARRAYS: arrays, wire.METRICS: metrics, SECAGG_RECORD: info})
    return Message(content, reply_to=origin)
