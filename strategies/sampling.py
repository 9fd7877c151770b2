"""Seeded client sampling in partition space.

Flower's strategies sample with the global ``random`` module over node ids, and node ids
change from run to run; so neither the same seed nor the same config gives the same
clients. Here the nodes are ordered by the partition they hold (learned once per node
with a query message), and a ``numpy`` generator seeded with ``(seed, round, stage)``
picks among them: the same config and seed sample the same partitions every run.

Each partition is held by one node: when a second connected node claims a partition
(two SuperNodes started with the same ``partition-id``), the node that claimed it first
keeps it, the other is left out with a warning naming both, and takes over if the first
disconnects (a SuperNode restarted with its old node config gets a new node id).

A node that has not said which partition it holds (its query failed or timed out) is
not sampled: a reply from it could not be bounded or ordered, and it may not be running
the app at all. It is asked again at most once per round (each query can block for the
query timeout), so a node that comes up late joins from the next round on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import WARNING

import numpy as np
from flwr.supercore import log

STAGES = {"train": 0, "evaluate": 1}


class PartitionSampler:
    """Chooses ``k`` nodes per round from those connected, deterministically.

    Parameters
    ----------
    seed : int
        The run's seed.
    discover : callable
        ``discover(node_ids) -> {node_id: partition_id}`` for nodes not seen before
        (the ServerApp sends them a query message).
    """

    def __init__(self, seed: int, discover: Callable[[list[int]], dict[int, int]]) -> None:
        self.seed = seed
        self._discover = discover
        self.partition_of: dict[int, int] = {}  # in the order the nodes were learned
        self._rank: dict[int, int] = {}  # node id -> when it was learned (first claim wins)
        self._asked_in_round: dict[int, int] = {}  # node id -> round it was last asked
        self._left_out: set[int] = set()  # duplicate claimants already warned about

    def learn(self, node_ids: Iterable[int], server_round: int = 0) -> None:
        """Ask the nodes not known yet, except those already asked in ``server_round``."""
        unknown = [n for n in node_ids if n not in self.partition_of
                   and self._asked_in_round.get(n) != server_round]
        if unknown:
            for node in unknown:
                self._asked_in_round[node] = server_round
            for node, pid in self._discover(unknown).items():
                self.partition_of[node] = pid
                self._rank[node] = len(self._rank)

    def ordered(self, node_ids: Iterable[int], server_round: int = 0) -> list[int]:
        """One node per known partition (its first claimant among ``node_ids``), sorted
        by partition id."""
        nodes = list(node_ids)
        self.learn(nodes, server_round)
        holder: dict[int, int] = {}
        for node in sorted((n for n in nodes if n in self.partition_of), key=self._rank.__getitem__):
            pid = self.partition_of[node]
            if pid not in holder:
                holder[pid] = node
            elif node not in self._left_out:
                self._left_out.add(node)
                log(WARNING, "Node %s claims partition-id %d, already held by node %s: left "
                             "out while that node is connected (give each SuperNode its own "
                             "partition-id)", node, pid, holder[pid])
        return [holder[pid] for pid in sorted(holder)]

    def choose(self, node_ids: Iterable[int], k: int, server_round: int, stage: str) -> list[int]:
        """``min(k, known nodes)`` distinct nodes, the same ones for the same seed, round
        and stage."""
        if k < 0:
            raise ValueError(f"Cannot sample {k} nodes")
        order = self.ordered(node_ids, server_round)
        k = min(k, len(order))
        rng = np.random.default_rng([self.seed, server_round, STAGES[stage]])
        picked = np.sort(rng.choice(len(order), size=k, replace=False))
        return [order[i] for i in picked]
