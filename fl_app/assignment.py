"""Which partition this ClientApp trains on: its node config, or, in simulation only,
the partition the server assigned it.

Deployment: a SuperNode's partition is its own node config (``partition-id``,
``num-partitions``), which the server learns with one query per node
(fl_app/nodes.py). A device never takes the server's word for it: a message that
carries a server-assigned partition (``wire.ASSIGNED``) is refused
(``AssignmentRefused``), whatever it says.

Simulation: asking 10,000 simulated nodes costs as much as a training round each
(Flower 1.42's in-memory delivery loop), so the server asks one node only (for the
federation's size). Every node there can load every benchmark partition (one machine,
the same data), so the server assigns them
itself (node ids sorted, partition = rank; ``NodeDirectory(assign=True)``) and every
message it sends carries the assignment (``AssigningGrid``). The engine's own
``partition-id`` (the node's creation index) is then not used: every reader of the
partition (the train and evaluate handlers, the fault injector, SecAgg+'s quantization
seed) calls ``node_partition(context, msg)`` and gets the same answer. The assignment
is also kept in ``Context.state``, so that a message without it (none is sent so today)
still finds the node's partition rather than the engine's index.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message

from fl_common import wire

from . import privacy_policy

STATE_KEY = "fl-app.assigned-partition"  # Context.state: the last assignment seen


class AssignmentRefused(ValueError):
    """A message carried a server-assigned partition outside Flower's simulation engine."""


def _checked(pid: object, num: object, source: str) -> tuple[int, int]:
    if isinstance(pid, bool) or isinstance(num, bool) or not isinstance(pid, int) \
            or not isinstance(num, int):
        raise ValueError(f"{source}: partition-id {pid!r} / num-partitions {num!r} are not integers")
    if not 0 <= pid < num:
        raise ValueError(f"{source} partition-id={pid} is not in [0, num-partitions={num})")
    return pid, num


def assigned_partition(msg: Message | None, context: Context) -> tuple[int, int] | None:
    """The server's assignment this message carries (remembered in ``Context.state``),
    else the one remembered from an earlier message; None where there is none. Raises
    ``AssignmentRefused`` for a message that carries one outside simulation."""
    record = None
    if msg is not None and msg.has_content():
        record = msg.content.config_records.get(wire.ASSIGNED)
    if record is not None:
        if not privacy_policy.in_simulation():
            raise AssignmentRefused(
                f"{wire.ASSIGNMENT_REFUSED}: the server assigned this node a partition "
                f"('{wire.ASSIGNED}'); only simulated nodes take one from the server. A "
                "deployed SuperNode trains on the partition of its own node config "
                f"('{wire.PARTITION_ID}', '{wire.NUM_PARTITIONS}')")
        pid, num = _checked(record.get(wire.PARTITION_ID), record.get(wire.NUM_PARTITIONS),
                            "Server-assigned")
        context.state.config_records[STATE_KEY] = ConfigRecord(
            {wire.PARTITION_ID: pid, wire.NUM_PARTITIONS: num})
        return pid, num
    kept = context.state.config_records.get(STATE_KEY)
    if kept is not None and privacy_policy.in_simulation():
        return _checked(kept.get(wire.PARTITION_ID), kept.get(wire.NUM_PARTITIONS),
                        "Server-assigned")
    return None


def node_partition(context: Context, msg: Message | None = None) -> tuple[int, int]:
    """``(partition-id, num-partitions)``: the server's assignment in simulation (see
    above), else the node config, checked."""
    if (assigned := assigned_partition(msg, context)) is not None:
        return assigned
    try:
        pid = int(context.node_config[wire.PARTITION_ID])
        num = int(context.node_config[wire.NUM_PARTITIONS])
    except KeyError as err:
        raise ValueError(
            f"Node config lacks {err}; start each SuperNode with --node-config "
            "'partition-id=<i> num-partitions=<n>'"
        ) from None
    if not 0 <= pid < num:
        raise ValueError(f"Node config partition-id={pid} is not in [0, num-partitions={num})")
    return pid, num


def partition_id(context: Context, msg: Message | None = None, default: int = 0) -> int:
    """The partition id ``node_partition`` gives, for the mods that only key a draw by it
    (faults, SecAgg+'s quantization seed): ``default`` where the node config has none."""
    if (assigned := assigned_partition(msg, context)) is not None:
        return assigned[0]
    return int(context.node_config.get(wire.PARTITION_ID, default))
