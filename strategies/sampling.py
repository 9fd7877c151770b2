"""Seeded client sampling in partition space.

Flower's strategies sample with the global ``random`` module over node ids, and node ids
change from run to run; so neither the same seed nor the same config gives the same
clients. Here the nodes are ordered by the partition they hold (learned once per node
with a query message), and a ``numpy`` generator seeded with ``(seed, round, stage)``
picks among them: the same config and seed sample the same partitions every run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

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
        self.partition_of: dict[int, int] = {}

    def learn(self, node_ids: Iterable[int]) -> None:
        unknown = [n for n in node_ids if n not in self.partition_of]
        if unknown:
            self.partition_of.update(self._discover(unknown))

    def ordered(self, node_ids: Iterable[int]) -> list[int]:
        """Nodes sorted by partition id (nodes that did not answer last, by node id)."""
        nodes = list(node_ids)
        self.learn(nodes)
        return sorted(nodes, key=lambda n: (self.partition_of.get(n, float("inf")), n))

    def choose(self, node_ids: Iterable[int], k: int, server_round: int, stage: str) -> list[int]:
        """``k`` distinct nodes, the same ones for the same seed, round and stage."""
        order = self.ordered(node_ids)
        if not 0 <= k <= len(order):
            raise ValueError(f"Cannot sample {k} of {len(order)} nodes")
        rng = np.random.default_rng([self.seed, server_round, STAGES[stage]])
        picked = np.sort(rng.choice(len(order), size=k, replace=False))
        return [order[i] for i in picked]
