"""Test helpers: a reply factory, a grid stand-in, and in-process SecAgg+ nodes."""

from __future__ import annotations

import time
from unittest.mock import Mock

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import message_from_proto, message_to_proto

from fl_common import wire
from fl_app.secagg_client import secagg_gate


def make_reply(
    arrays: dict[str, np.ndarray] | None,
    num_examples: float | None = 10,
    node_id: int = 1,
    error: str | None = None,
    extra_metrics: dict | None = None,
    array_key: str = "arrays",
) -> Mock:
    """A reply as a strategy sees it: a Mock(spec=Message) around a real RecordDict."""
    content = RecordDict()
    if arrays is not None:
        content[array_key] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    metrics = dict(extra_metrics or {})
    if num_examples is not None:
        metrics["num-examples"] = num_examples
    content["metrics"] = MetricRecord(metrics)
    msg = Mock(spec=Message)
    msg.content = content
    msg.has_error.return_value = error is not None
    msg.error = Mock(reason=error)
    msg.metadata = Mock(src_node_id=node_id)
    return msg


def make_grid(node_ids: list[int]) -> Mock:
    grid = Mock()
    grid.get_node_ids.return_value = list(node_ids)
    return grid


# ------------------------------------------------------------------ SecAgg+ in one process
class Node:
    """One client: its context and what its (stand-in) train handler returns."""

    def __init__(self, node_id: int, partition: int, arrays: dict[str, np.ndarray],
                 num_examples: float) -> None:
        self.context = Context(run_id=1, node_id=node_id,
                               node_config={wire.PARTITION_ID: partition,
                                            wire.NUM_PARTITIONS: 1_000_000},
                               state=RecordDict(), run_config={})
        self.arrays = arrays
        self.num_examples = num_examples
        self.trained = 0

    def handler(self, msg: Message, context: Context) -> Message:
        self.trained += 1
        return Message(RecordDict({
            wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in self.arrays.items()}),
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: self.num_examples, "loss": 0.5}),
        }), reply_to=msg)


def wire_roundtrip(message: Message) -> Message:
    """What the other side receives: serialized and parsed again."""
    return message_from_proto(message_to_proto(message))


class ClientAppGrid:
    """Delivers each message, serialized both ways, to the real ClientApp (its mods
    included) of the node's ``Context`` in ``contexts``; an exception becomes an error
    reply (as Flower sends it) and a reply slower than ``timeout`` is missing. ``seen``:
    every message delivered."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts = contexts
        self.seen: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        from fl_app import client_app

        replies = []
        for msg in messages:
            msg = wire_roundtrip(msg)
            self.seen.append(msg)
            started = time.monotonic()
            try:
                reply = client_app.app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as err:  # noqa: BLE001 - as a ClientApp reports it
                reply = Message(error=Error(code=0, reason=repr(err)), reply_to=msg)
            if timeout is not None and time.monotonic() - started > timeout:
                continue  # the server stopped waiting
            replies.append(wire_roundtrip(reply))
        return replies


class LoopbackGrid:
    """Delivers each message to its node through ``secagg_gate`` (Flower's mod inside).

    ``drop``: stage -> node ids that do not answer that stage (a lost reply);
    ``received``: every reply the server got, for the "sees only masked data" test.
    """

    def __init__(self, nodes: dict[int, Node], drop: dict[str, set[int]] | None = None) -> None:
        self.nodes = nodes
        self.drop = drop or {}
        self.received: list[tuple[str, Message]] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg = wire_roundtrip(msg)
            nid = msg.metadata.dst_node_id
            stage = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            if nid in self.drop.get(stage, set()):
                continue
            node = self.nodes[nid]
            try:
                reply = secagg_gate(msg, node.context, node.handler)
            except Exception as err:  # as a ClientApp would report it
                reply = Message(error=Error(code=1, reason=repr(err)), reply_to=msg)
            reply = wire_roundtrip(reply)
            self.received.append((stage, reply))
            replies.append(reply)
        return replies
