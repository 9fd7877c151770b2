"""Which partition each node holds, and what it says of its own data: one query per node
in deployment; in simulation the server assigns them and asks one node only, for the
federation's size.

Simulation (``NodeDirectory(assign=True)``): one query per node costs as much as a
training message in Flower 1.42's in-memory delivery loop (minutes at 10,000 nodes), and
a simulated node's answer says nothing the server cannot know: every node can load every
benchmark partition (one machine, the same data), the engine's ``partition-id`` is just
the node's creation index, and node ids are random per run. So the server assigns them
itself: node ids sorted, partition = rank, num-partitions = the federation's size (one
query to one node, whose node config Flower sets to it; the server then waits until that
many nodes are registered), keeps-state true (the server-sent client-state folder is
honoured in simulation), no own data.
``AssigningGrid`` adds each node's assignment to every message sent to it
(``wire.ASSIGNED``); the ClientApp takes it only inside the simulation engine
(fl_app/assignment.py). Sampling stays in partition space (strategies/sampling.py), so
the same seed samples the same partitions for any set of node ids, and client state,
keyed by partition, is found again on resume.

Every reply is parsed defensively: a node whose reply lacks a field, has one of the
wrong type, or names a partition outside [0, num-partitions) is left out of the run with
a warning naming it and the problem (never an exception in the ServerApp: one malformed
or malicious SuperNode must not end everyone's run).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fl_common import wire
from strategies.grid_wrapper import DelegatingGrid

QUERY_TIMEOUT = 120.0
QUERY_BATCH = 1000  # query messages in flight at once (see NodeDirectory.discover)
REGISTER_GRACE = 60.0  # seconds for the simulation engine to register all its nodes


def _integer(metrics, key: str) -> int:
    value = metrics[key]  # KeyError: missing
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or int(value) != value:
        raise ValueError(f"'{key}' = {value!r} is not an integer")
    return int(value)


def parse_query_reply(reply: Message) -> tuple[tuple[int, int], bool, tuple[int | None, list[int] | None] | None]:
    """((partition id, num partitions), keeps state, own data (size, label counts) or
    None) from a query reply; ValueError naming the problem for a malformed one."""
    try:
        metrics = reply.content[wire.METRICS]
    except KeyError:
        raise ValueError(f"the reply has no '{wire.METRICS}' record") from None
    try:
        pid, num = _integer(metrics, wire.PARTITION_ID), _integer(metrics, wire.NUM_PARTITIONS)
        keeps = bool(_integer(metrics, wire.KEEPS_STATE)) if wire.KEEPS_STATE in metrics else False
    except KeyError as err:
        raise ValueError(f"the reply lacks {err}") from None
    if num < 1 or not 0 <= pid < num:
        raise ValueError(f"partition-id {pid} is not in [0, num-partitions = {num})")
    own = None
    if wire.OWN_DATA in metrics and _integer(metrics, wire.OWN_DATA):
        size = _integer(metrics, wire.DATA_SIZE) if wire.DATA_SIZE in metrics else None
        counts = None
        if wire.LABEL_COUNTS in metrics:
            counts = list(metrics[wire.LABEL_COUNTS])
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                raise ValueError(f"'{wire.LABEL_COUNTS}' must be non-negative integers")
        if size is not None and (size < 0 or (counts is not None and sum(counts) != size)):
            raise ValueError(f"'{wire.DATA_SIZE}' = {size} disagrees with its label counts")
        own = (size, counts)
    return (pid, num), keeps, own


class NodeDirectory:
    """Which partition each node holds, learned once per node with a query message.

    ``data_stats``: what the query asks own-data nodes to report (``wire.DATA_STATS``):
    "all" (size and label counts), "size" (under sample-level DP) or "none" (dp-mode
    user, where a client's size is private).
    """

    def __init__(self, grid: Grid, data_stats: str = "all", assign: bool = False) -> None:
        if data_stats not in wire.DATA_STATS_LEVELS:
            raise ValueError(f"data_stats must be one of {list(wire.DATA_STATS_LEVELS)}")
        self.grid = grid
        self.data_stats = data_stats
        self.assign = assign  # simulation: assign partitions, one size query (module doc)
        self.queries_sent = 0
        self.partition: dict[int, tuple[int, int]] = {}
        self.keeps_state: dict[int, bool] = {}
        # node -> (size, label counts); either None where the node did not report it
        self.own_data_of: dict[int, tuple[int | None, list[int] | None]] = {}
        self.malformed: dict[int, str] = {}  # node -> why its reply was left out

    def discover(self, node_ids: list[int]) -> dict[int, int]:
        """Ask the nodes not known yet which partition they hold, QUERY_BATCH at a time:
        Flower's in-memory simulation scans every stored message for every node each
        delivery cycle (flwr/server/superlink/linkstate/in_memory_linkstate.py,
        get_message_ins), so 10,000 queries at once are slow enough to time out, and a
        query whose reply is never pulled stays stored, slowing every later round."""
        unknown = [n for n in node_ids if n not in self.partition and n not in self.malformed]
        if self.assign:
            self._assign(unknown)
            wanted = set(node_ids)
            return {n: pid for n, (pid, _) in self.partition.items() if n in wanted}
        started = time.perf_counter()
        for start in range(0, len(unknown), QUERY_BATCH):
            self._query(unknown[start:start + QUERY_BATCH])
            if len(unknown) > QUERY_BATCH:  # minutes at 10,000 nodes: say how far it got
                log(INFO, "Asked %d of %d nodes which partition they hold (%.0f s)",
                    min(start + QUERY_BATCH, len(unknown)), len(unknown),
                    time.perf_counter() - started)
        wanted = set(node_ids)  # in the order the nodes answered: the first claim wins
        return {n: pid for n, (pid, _) in self.partition.items() if n in wanted}

    def _assign(self, unknown: list[int]) -> None:
        """Simulation: partition = rank of the node id among the federation's nodes,
        fixed the first time (the engine's node set does not change during a run)."""
        if not unknown:
            return
        if self.partition:  # a node that was not there when the partitions were assigned
            log(WARNING, "Node(s) %s joined after the partitions were assigned: not sampled",
                sorted(unknown)[:10])
            self.malformed.update({n: "joined after the assignment" for n in unknown})
            return
        total = self._federation_size(unknown)
        everyone = self._all_registered(total, set(unknown))
        if len(everyone) < total:
            log(WARNING, "Simulation: %d of %d nodes registered after %.0f s; partitions "
                         "assigned to those (the others' partitions are not sampled)",
                len(everyone), total, REGISTER_GRACE)
        for rank, node in enumerate(everyone):
            self.partition[node] = (rank, total)
            self.keeps_state[node] = True
        log(INFO, "Simulation: %d partitions assigned to the %d nodes by node id (one "
                  "query sent, for the federation's size)", total, len(everyone))

    def _federation_size(self, candidates: list[int]) -> int:
        """num-supernodes, from one node's query reply (its node config's num-partitions,
        which Flower sets to the federation's size); a few nodes are tried if a reply is
        missing or malformed. The node count seen so far is not enough: Flower registers
        the simulated nodes in a thread that runs alongside the ServerApp's."""
        for node in candidates[:3]:
            self._query([node])
            if node in self.partition:
                total = self.partition.pop(node)[1]
                self.keeps_state.pop(node, None)
                self.own_data_of.pop(node, None)
                return total
        raise RuntimeError("No simulated node answered a query (see the ClientApp logs)")

    def _all_registered(self, total: int, seen: set[int]) -> list[int]:
        """The sorted node ids once ``total`` are registered (at most REGISTER_GRACE s)."""
        deadline = time.monotonic() + REGISTER_GRACE
        while True:
            everyone = sorted(set(self.grid.get_node_ids()) | seen)
            if len(everyone) >= total or time.monotonic() > deadline:
                return everyone
            time.sleep(0.05)

    def assignment(self, node_id: int) -> tuple[int, int] | None:
        """The (partition, num partitions) assigned to ``node_id``; None when not assigning."""
        return self.partition.get(node_id) if self.assign else None

    def _query(self, unknown: list[int]) -> None:
        if not unknown:
            return
        self.queries_sent += len(unknown)
        messages = [
            Message(RecordDict({wire.CONFIG: ConfigRecord({wire.DATA_STATS: self.data_stats})}),
                    dst_node_id=n, message_type=MessageType.QUERY)
            for n in unknown
        ]
        asked = set(unknown)
        for reply in self.grid.send_and_receive(messages, timeout=QUERY_TIMEOUT):
            node = reply.metadata.src_node_id
            if node not in asked or node in self.partition:
                continue
            if reply.has_error():
                log(WARNING, "Node %s did not say which partition it holds: %s",
                    node, reply.error.reason)
                continue
            try:
                partition, keeps, own = parse_query_reply(reply)
            except (ValueError, TypeError) as err:
                self.malformed[node] = str(err)
                log(WARNING, "Node %s is left out of the run: malformed query reply (%s)",
                    node, err)
                continue
            self.partition[node] = partition
            self.keeps_state[node] = keeps
            if own is not None:
                self.own_data_of[node] = own

    def own_data(self, node_ids: list[int], num_partitions: int,
                 num_classes: int) -> dict[int, tuple[int | None, list[int] | None]]:
        """partition id -> (size, label counts) for the nodes that hold their own data
        (node config ``data-path``), as far as they reported them (None where they did
        not: under DP, or by their own policy); empty when none does."""
        out: dict[int, tuple[int | None, list[int] | None]] = {}
        held: set[int] = set()
        for node, pid in self.discover(node_ids).items():  # as PartitionSampler: first claim wins
            if pid in held:
                log(WARNING, "Node %s claims partition-id %d, already held by another node: "
                             "left out (give each SuperNode its own partition-id in [0, %d))",
                    node, pid, num_partitions)
                continue
            held.add(pid)
            if node not in self.own_data_of:
                continue
            size, counts = self.own_data_of[node]
            if size is not None and size < 2:
                raise ValueError(f"The node with partition-id {pid} holds {size} sample(s) in "
                                 "its data-path; each needs one training and one validation sample")
            if counts is not None:
                counts = (counts + [0] * num_classes)[:num_classes]
            out[pid] = (size, counts)
        return out

    def num_partitions(self, node_ids: list[int]) -> int:
        self.discover(node_ids)
        counts = {self.partition[n][1] for n in node_ids if n in self.partition}
        if not counts:
            raise RuntimeError("No node reported its partition; check the ClientApp logs")
        if len(counts) > 1:
            raise ValueError(f"Nodes disagree on num-partitions: {sorted(counts)}")
        return counts.pop()

    def without_state(self, node_ids: list[int]) -> list[int]:
        """The partitions of ``node_ids`` whose node keeps no state across restarts."""
        known = self.discover(node_ids)
        return sorted(pid for node, pid in known.items() if not self.keeps_state.get(node, False))


class AssigningGrid(DelegatingGrid):
    """A ``Grid`` that adds each node's assigned partition (``wire.ASSIGNED``) to every
    message sent to it (simulation only: ``NodeDirectory(assign=True)``).

    Flower's strategies give one RecordDict to all the messages of a round; each message
    here gets its own shallow copy (the records themselves are shared, not copied) with
    the one small ConfigRecord added. Everything else is delegated.
    """

    def __init__(self, grid: Grid, nodes: NodeDirectory) -> None:
        if not nodes.assign:
            raise ValueError("AssigningGrid needs a NodeDirectory that assigns partitions")
        super().__init__(grid)
        self.nodes = nodes

    def _stamped(self, messages: Iterable[Message]) -> list[Message]:
        out = []
        for msg in messages:
            assigned = self.nodes.assignment(msg.metadata.dst_node_id)
            if assigned is not None and msg.has_content():
                content = RecordDict(dict(msg.content))
                content[wire.ASSIGNED] = ConfigRecord(
                    {wire.PARTITION_ID: assigned[0], wire.NUM_PARTITIONS: assigned[1]})
                msg.content = content
            out.append(msg)
        return out

    # ---- what it adds
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(self._stamped(messages))

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(self._stamped(messages), timeout=timeout)
