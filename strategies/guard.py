"""``Guarded``: a Strategy wrapper that keeps bad replies out and sampling reproducible.

Wrapping (as Flower's DP wrappers do) keeps every algorithm module free of this
cross-cutting work; the same wrapper serves Flower's built-ins and our own strategies.

Per training round it
1. re-addresses the inner strategy's messages to nodes chosen by a ``PartitionSampler``
   (same seed, same partitions; the inner strategy still decides how many);
2. validates every reply (``validation.split_replies``) against the layout the inner
   strategy expects back (``inner.reply_array_spec(arrays)`` if it defines one, else the
   layout of the arrays sent), logs each rejection with its reason and leaves it out;
3. skips aggregation, leaving the global model unchanged, when fewer than
   ``min_valid_replies`` replies are valid, or when the inner aggregate is not finite or
   has another layout than the global model (the inner strategy's state is then rolled
   back too, so a server optimizer's moments are not poisoned);
4. adds round statistics to the train metrics: valid/rejected replies, upload and
   download bytes per client, and the seconds the training phase took.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fl_app import wire

from .sampling import PartitionSampler
from .validation import ArraySpec, array_spec, check_arrays, record_nbytes, split_replies


class Guarded(Strategy):
    """Validate replies, sample reproducibly and report round statistics for ``inner``."""

    def __init__(
        self,
        inner: Strategy,
        *,
        sampler: PartitionSampler | None = None,
        min_valid_replies: int = 1,
        weighted_by_key: str = wire.NUM_EXAMPLES,
    ) -> None:
        if min_valid_replies < 1:
            raise ValueError(f"min_valid_replies must be >= 1, got {min_valid_replies}")
        self.inner = inner
        self.sampler = sampler
        self.min_valid_replies = min_valid_replies
        self.weighted_by_key = weighted_by_key
        self._global_spec: dict[str, ArraySpec] | None = None
        self._expected_spec: dict[str, ArraySpec] | None = None
        self._download_bytes = 0
        self._round_started = 0.0
        self.last_train_metrics: MetricRecord | None = None
        self.last_evaluate_metrics: MetricRecord | None = None

    # ------------------------------------------------------------------ helpers
    def _readdress(self, messages: list[Message], grid: Grid, server_round: int, stage: str) -> list[Message]:
        if self.sampler is None or not messages:
            return messages
        if any(m.content is not messages[0].content for m in messages[1:]):
            # Per-node content: the inner strategy's own choice of nodes must stand.
            return messages
        chosen = self.sampler.choose(grid.get_node_ids(), len(messages), server_round, stage)
        for message, node_id in zip(messages, chosen):
            message.metadata.dst_node_id = node_id
        return messages

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
    def summary(self) -> None:
        log(INFO, "\t├──> Guarded: reply validation, seeded partition-space sampling, "
                  "at least %d valid replies per round", self.min_valid_replies)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_started = time.perf_counter()
        self._global_spec = array_spec(arrays)
        spec_fn = getattr(self.inner, "reply_array_spec", None)
        self._expected_spec = spec_fn(arrays) if spec_fn else self._global_spec
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        messages = self._readdress(messages, grid, server_round, "train")
        self._download_bytes = (
            sum(record_nbytes(r) for r in messages[0].content.array_records.values())
            if messages else 0
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, rejected = split_replies(self._in_partition_order(replies),
                                        self._expected_spec, self.weighted_by_key)
        self._log_rejections("aggregate_train", rejected)
        upload = [
            sum(record_nbytes(r) for r in m.content.array_records.values()) for m in valid
        ]
        stats = {
            wire.REPLIES_VALID: len(valid),
            wire.REPLIES_REJECTED: len(rejected),
            wire.UPLOAD_BYTES: int(sum(upload) / len(upload)) if upload else 0,
            wire.DOWNLOAD_BYTES: self._download_bytes,
        }
        arrays: ArrayRecord | None = None
        metrics: MetricRecord | None = None
        if len(valid) < self.min_valid_replies:
            log(WARNING, "aggregate_train: %d valid replies, fewer than the minimum %d; "
                         "the global model is left unchanged", len(valid), self.min_valid_replies)
        else:
            snapshot = copy.deepcopy(self.inner.__dict__)
            arrays, metrics = self.inner.aggregate_train(server_round, valid)
            problem = check_arrays(arrays, self._global_spec) if arrays is not None else None
            if problem:
                log(WARNING, "aggregate_train: the aggregate was discarded (%s); the global "
                             "model and the strategy state are left unchanged", problem)
                self.inner.__dict__.clear()
                self.inner.__dict__.update(snapshot)
                arrays = None
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
        return self._readdress(messages, grid, server_round, "evaluate")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid, rejected = split_replies(self._in_partition_order(replies), None,
                                        self.weighted_by_key)
        self._log_rejections("aggregate_evaluate", rejected)
        metrics = self.inner.aggregate_evaluate(server_round, valid) if valid else None
        self.last_evaluate_metrics = metrics
        return metrics
