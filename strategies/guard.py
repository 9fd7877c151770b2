"""``Guarded``: a Strategy wrapper that keeps bad replies out and sampling reproducible.

Wrapping (as Flower's DP wrappers do) keeps every algorithm module free of this
cross-cutting work; the same wrapper serves Flower's built-ins and our own strategies.

Per training round it
1. re-addresses the inner strategy's messages to nodes chosen by a ``PartitionSampler``
   (same seed, same partitions; the inner strategy still decides how many; a node that
   has not said which partition it holds is not sampled);
2. validates every reply (``validation.split_replies``) against the layout the inner
   strategy expects back (``reply_layout(arrays)``, from the strategy's spec, else the
   layout of the arrays sent) and against the client's bound on ``num-examples``
   (``ExampleLimits``), logs each rejection with its reason and leaves it out;
3. skips aggregation, leaving the global model unchanged, when fewer than
   ``min_valid_replies`` replies are valid;
4. casts a finite aggregate back to the global model's dtypes, then discards it and
   rolls the inner strategy's state back to before the round when the aggregate is not
   finite, has another layout than the global model, or leaves the strategy's own state
   (its ``state_dict()``: SCAFFOLD's c, Adam's moments; or its attributes) non-finite.
   A rolled-back round leaves no trace: a finite model with v = Inf would otherwise
   freeze FedAdam for the rest of the run, and c = Inf would poison SCAFFOLD;
5. adds round statistics to the train metrics: valid/rejected replies, whether the
   round's aggregate stood, upload and download bytes per client, and the seconds the
   training phase took.

Under secure aggregation (``strategies/secagg.py``) a train round returns ONE reply, the
unmasked weighted mean of the contributions of several nodes. Then the checks apply to
that sum: its layout and finiteness, its ``num-examples`` against the sum of the
contributors' bounds, and the minimum of valid replies counts its contributors. What is
lost is the per-client check: a finite but wrong update within the clipping range is
averaged in unseen. What remains is on the client (``fl_app/secagg_client.py`` refuses
to upload a non-finite update or one weighted above ``secagg-max-weight``), in the
protocol (each weighted value is clipped to +-``secagg-clipping-range``; the unmasked
weight sum must equal what the clients' plaintext num-examples imply; after unmasking,
every coordinate of the sum must lie in [0, m·T], what m clipped uploads can produce, so
a malicious client can still move each coordinate of the mean by up to about m·c·W/Σn
without detection), and here.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from fl_common import wire

from .sampling import PartitionSampler
from .spec import PerClientRecords
from .secagg import (
    DP_EPSILONS,
    SECAGG_ERROR_CODE,
    SECAGG_FAILED,
    SECAGG_RECORD,
    contributors,
    is_secure_aggregate,
)
from .validation import (
    ArraySpec,
    array_spec,
    cast_like,
    check_arrays,
    first_non_finite,
    record_nbytes,
    split_replies,
    strategy_state,
)


@dataclass(frozen=True)
class ExampleLimits:
    """The largest ``num-examples`` accepted from a client, per stage.

    ``train`` / ``evaluate``: partition id -> its training / validation set size (known
    to the server in simulation, where it computes the split); every other client gets
    ``default`` (run-config ``max-num-examples``).
    """

    default: int
    train: dict[int, int] = field(default_factory=dict)
    evaluate: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.default:
            raise ValueError(f"ExampleLimits.default must be >= 1, got {self.default}")

    def bound(self, partition: int | None, stage: str) -> int:
        table = self.train if stage == "train" else self.evaluate
        return table.get(partition, self.default) if partition is not None else self.default


DEFAULT_MAX_NUM_EXAMPLES = 1_000_000  # run-config 'max-num-examples' default


def _dp_stats(valid: list[Message], rejected: list[tuple[Message, str]]) -> dict[str, float]:
    """Max and mean epsilon over the valid DP replies, how many clients were out of the
    run's budget (error reason ``wire.DP_OUT_OF_BUDGET``) and how many refused by their
    own privacy policy (``wire.DP_POLICY_REFUSED``). Empty without DP."""
    spends = []
    for message in valid:
        if is_secure_aggregate(message):  # the contributors' spends, sent in plaintext
            info = message.content.config_records[SECAGG_RECORD]
            spends.extend(float(e) for e in info.get(DP_EPSILONS, []))
            continue
        metrics = next(iter(message.content.metric_records.values()))
        if wire.DP_EPSILON in metrics:
            spends.append(float(metrics[wire.DP_EPSILON]))
    def refused(prefix: str) -> int:
        return sum(1 for m, _ in rejected
                   if m.has_error() and str(m.error.reason).startswith(prefix))

    out_of_budget, policy = refused(wire.DP_OUT_OF_BUDGET), refused(wire.DP_POLICY_REFUSED)
    if not spends and not out_of_budget and not policy:
        return {}
    stats = {wire.DP_OUT_OF_BUDGET: out_of_budget, wire.DP_POLICY_REFUSED: policy}
    if spends:
        stats[wire.DP_EPSILON_MAX] = max(spends)
        stats[wire.DP_EPSILON_MEAN] = sum(spends) / len(spends)
    return stats


def _chain(strategy: Strategy) -> list[Strategy]:
    """``strategy`` and every strategy it wraps (attributes that are strategies), once."""
    out, todo = [], [strategy]
    while todo:
        layer = todo.pop()
        if any(layer is seen for seen in out):
            continue
        out.append(layer)
        todo.extend(v for v in vars(layer).values() if isinstance(v, Strategy))
    return out


def _snapshot(strategy: Strategy) -> list[tuple[Strategy, dict]]:
    """Each layer of the chain with a deep copy of its own attributes (the strategies it
    wraps excluded: they are layers of their own, restored in place)."""
    return [(layer, copy.deepcopy({k: v for k, v in vars(layer).items()
                                   if not isinstance(v, Strategy)}))
            for layer in _chain(strategy)]


def _restore(snapshot: list[tuple[Strategy, dict]]) -> None:
    """Put every layer's attributes back into the same objects: a wrapper keeps wrapping
    the very strategy the rest of the app holds (the guard's attach hook, the sampler's
    lookups), so a rollback under a wrapper cannot swap in a stale copy."""
    for layer, saved in snapshot:
        for name in [k for k, v in vars(layer).items() if not isinstance(v, Strategy)]:
            if name not in saved:
                delattr(layer, name)
        for name, value in saved.items():
            setattr(layer, name, value)


class Guarded(Strategy):
    """Validate replies, sample reproducibly and report round statistics for ``inner``."""

    def __init__(
        self,
        inner: Strategy,
        *,
        sampler: PartitionSampler | None = None,
        min_valid_replies: int = 1,
        weighted_by_key: str = wire.NUM_EXAMPLES,
        example_limits: ExampleLimits | None = None,
        reply_layout: Callable[[ArrayRecord], dict[str, ArraySpec]] | None = None,
        per_client: PerClientRecords | None = None,
    ) -> None:
        if min_valid_replies < 1:
            raise ValueError(f"min_valid_replies must be >= 1, got {min_valid_replies}")
        self.inner = inner
        self.sampler = sampler
        self.min_valid_replies = min_valid_replies
        self.weighted_by_key = weighted_by_key
        self.example_limits = example_limits or ExampleLimits(default=DEFAULT_MAX_NUM_EXAMPLES)
        self._global_spec: dict[str, ArraySpec] | None = None
        self._expected_spec: dict[str, ArraySpec] | None = None
        self._download_bytes = 0
        self._sent = 0
        self._round_started = 0.0
        self.last_train_metrics: MetricRecord | None = None
        self.last_evaluate_metrics: MetricRecord | None = None
        # The layout a valid reply has, given the arrays sent (the spec's reply layout:
        # SCAFFOLD adds Delta c_i); None: the layout of the arrays sent.
        self.reply_layout = reply_layout
        # A strategy in the chain with per-client records (SCAFFOLD's accepted entry)
        # attaches them after the sampler has chosen the nodes, not before.
        self._attach = None
        if per_client is not None:
            per_client.attach_later = True
            self._attach = per_client.attach_accepted

    # ------------------------------------------------------------------ helpers
    def _readdress(self, messages: list[Message], grid: Grid, server_round: int, stage: str) -> list[Message]:
        if self.sampler is None or not messages:
            return messages
        if any(m.content is not messages[0].content for m in messages[1:]):
            # Per-node content: the inner strategy's own choice of nodes must stand.
            return messages
        chosen = self.sampler.choose(grid.get_node_ids(), len(messages), server_round, stage)
        if len(chosen) < len(messages):
            log(WARNING, "%s round %d: only %d node(s) said which partition they hold; "
                         "sending %d of %d messages", stage, server_round, len(chosen),
                len(chosen), len(messages))
            messages = messages[:len(chosen)]
        for message, node_id in zip(messages, chosen):
            message.metadata.dst_node_id = node_id
        return messages

    def _partition(self, node_id: int) -> int | None:
        return self.sampler.partition_of.get(node_id) if self.sampler else None

    def _bound(self, stage: str):
        """A reply's bound on num-examples: its sender's, or for a secure aggregate the
        sum of its contributors' bounds."""
        return lambda msg: sum(self.example_limits.bound(self._partition(node), stage)
                               for node in contributors(msg))

    def _rollback_reason(self, arrays: ArrayRecord) -> str | None:
        problem = check_arrays(arrays, self._global_spec)
        if problem:
            return problem
        bad = first_non_finite(strategy_state(self.inner), type(self.inner).__name__)
        return f"the strategy's state is not finite at {bad}" if bad else None

    def _in_partition_order(self, replies: Iterable[Message]) -> list[Message]:
        """Replies sorted by partition, so that sums are added in the same order every run."""
        replies = list(replies)
        if self.sampler is None:
            return replies
        known = self.sampler.partition_of
        return sorted(replies, key=lambda m: (known.get(m.metadata.src_node_id, float("inf")),
                                              m.metadata.src_node_id))

    def _log_rejections(self, stage: str, rejected: list[tuple[Message, str]]) -> None:
        for msg, reason in rejected:
            node = msg.metadata.src_node_id
            partition = self.sampler.partition_of.get(node) if self.sampler else None
            log(WARNING, "%s: left out the reply of node %s (partition %s): %s",
                stage, node, partition, reason)

    # ------------------------------------------------------------------ Strategy API
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
    ) -> Result:
        """Flower's ``Strategy.start`` loop (flwr/serverapp/strategy/strategy.py, 1.42),
        which always starts at round 1, with one addition for resuming a run:
        ``first_round`` > 1 continues from a checkpoint (``initial_arrays`` = the model
        after round ``first_round - 1``, this strategy's state already restored) without
        evaluating the initial model again. Per round, as in Flower: train, federated
        evaluation, then ``evaluate_fn`` (where the ServerApp records and checkpoints)."""
        if first_round <= 1:
            return super().start(grid, initial_arrays, num_rounds, timeout, train_config,
                                 evaluate_config, evaluate_fn)
        log(INFO, "Resuming %s at round %d of %d", type(self.inner).__name__, first_round,
            num_rounds)
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result, arrays = Result(), initial_arrays
        for current_round in range(first_round, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", current_round, num_rounds)
            replies = grid.send_and_receive(
                messages=self.configure_train(current_round, arrays, train_config, grid),
                timeout=timeout)
            agg_arrays, train_metrics = self.aggregate_train(current_round, replies)
            if agg_arrays is not None:
                result.arrays = arrays = agg_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[current_round] = train_metrics
            replies = grid.send_and_receive(
                messages=self.configure_evaluate(current_round, arrays, evaluate_config, grid),
                timeout=timeout)
            evaluate_metrics = self.aggregate_evaluate(current_round, replies)
            if evaluate_metrics is not None:
                result.evaluate_metrics_clientapp[current_round] = evaluate_metrics
            if evaluate_fn:
                res = evaluate_fn(current_round, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[current_round] = res
        return result

    def summary(self) -> None:
        log(INFO, "\t├──> Guarded: reply validation, seeded partition-space sampling, "
                  "at least %d valid replies per round", self.min_valid_replies)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_started = time.perf_counter()
        self._global_spec = array_spec(arrays)
        self._expected_spec = (self.reply_layout(arrays) if self.reply_layout is not None
                               else self._global_spec)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        messages = self._readdress(messages, grid, server_round, "train")
        if self._attach is not None:  # per-client records, once the nodes are final
            messages = self._attach(messages)
        self._sent = len(messages)
        self._download_bytes = (
            sum(record_nbytes(r) for r in messages[0].content.array_records.values())
            if messages else 0
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, rejected = split_replies(self._in_partition_order(replies),
                                        self._expected_spec, self.weighted_by_key,
                                        self._bound("train"))
        self._log_rejections("aggregate_train", rejected)
        failed = any(m.has_error() and m.error.code == SECAGG_ERROR_CODE for m, _ in rejected)
        secure = failed or any(is_secure_aggregate(m) for m in valid)
        num_valid = sum(len(contributors(m)) for m in valid)
        stats = {
            wire.REPLIES_VALID: num_valid,
            wire.REPLIES_REJECTED: self._sent - num_valid if secure else len(rejected),
            # messages sent that got no reply at all within the round's timeout
            wire.REPLIES_MISSING: 0 if secure else max(self._sent - num_valid - len(rejected), 0),
            **_dp_stats(valid, rejected),
            wire.DOWNLOAD_BYTES: self._download_bytes,
        }
        if failed:  # the protocol could not unmask a sum this round (see the log)
            stats[SECAGG_FAILED] = 1
        if not secure:  # (under SecAgg+ the protocol reports the masked uploads' size)
            upload = [sum(record_nbytes(r) for r in m.content.array_records.values())
                      for m in valid]
            stats[wire.UPLOAD_BYTES] = int(sum(upload) / len(upload)) if upload else 0
        arrays: ArrayRecord | None = None
        metrics: MetricRecord | None = None
        if num_valid < self.min_valid_replies:
            log(WARNING, "aggregate_train: %d valid replies, fewer than the minimum %d; "
                         "the global model is left unchanged", num_valid, self.min_valid_replies)
        else:
            snapshot = _snapshot(self.inner)
            arrays, metrics = self.inner.aggregate_train(server_round, valid)
            if arrays is not None:
                arrays = cast_like(arrays, self._global_spec)
            problem = self._rollback_reason(arrays) if arrays is not None else None
            if problem:
                log(WARNING, "aggregate_train: the aggregate was discarded (%s); the global "
                             "model and the strategy state are left unchanged", problem)
                _restore(snapshot)
                arrays = None
        stats[wire.ROUND_AGGREGATED] = int(arrays is not None)
        stats[wire.TRAIN_SECONDS] = time.perf_counter() - self._round_started
        merged = MetricRecord(dict(metrics) if metrics is not None else {})
        for key, value in stats.items():
            merged[key] = value
        self.last_train_metrics = merged
        return arrays, merged

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        messages = self._readdress(messages, grid, server_round, "evaluate")
        if self._attach is not None:  # an evaluating client needs its entry too (FedPer)
            messages = self._attach(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid, rejected = split_replies(self._in_partition_order(replies), None,
                                        self.weighted_by_key, self._bound("evaluate"))
        self._log_rejections("aggregate_evaluate", rejected)
        metrics = self.inner.aggregate_evaluate(server_round, valid) if valid else None
        self.last_evaluate_metrics = metrics
        return metrics
