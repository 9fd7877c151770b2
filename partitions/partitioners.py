"""Run-config name -> flwr-datasets partitioner. Every split goes through flwr-datasets.

- ``iid``: ``IidPartitioner`` (equal contiguous shards of the seeded-shuffled train split);
- ``dirichlet``: ``DirichletPartitioner`` with concentration ``alpha`` per label (Yurochkin
  et al. 2019; NIID-Bench's "Dirichlet label skew"); smaller ``alpha``, more skew;
- ``pathological``: ``PathologicalPartitioner`` with exactly ``classes-per-partition``
  labels per client, ``first-deterministic`` assignment as in NIID-Bench (#C = k);
- ``shard``: ``ShardPartitioner`` (McMahan et al. 2017): the label-sorted data cut into
  equal shards, ``shards-per-partition`` per client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from flwr_datasets.partitioner import Partitioner

PARTITIONERS = ("iid", "dirichlet", "pathological", "shard")
# NIID-Bench and flwr-datasets use 10; the Dirichlet draw is repeated until it holds.
DIRICHLET_MIN_PARTITION_SIZE = 10


def build_partitioner(
    name: str,
    num_partitions: int,
    *,
    label_key: str,
    alpha: float,
    classes_per_partition: int,
    shards_per_partition: int,
    seed: int,
) -> Partitioner:
    """A fresh, unassigned flwr-datasets partitioner for ``name``. flwr-datasets (and the
    Hugging Face ``datasets`` it pulls in, seconds of imports) is imported here, not with
    the module: a deployed node reading its partition from its cache never needs it."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
        ShardPartitioner,
    )

    if num_partitions < 1:
        raise ValueError(f"num-partitions must be >= 1, got {num_partitions}")
    if name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=label_key,
            alpha=alpha,
            min_partition_size=DIRICHLET_MIN_PARTITION_SIZE,
            self_balancing=False,
            seed=seed,
        )
    if name == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by=label_key,
            num_classes_per_partition=classes_per_partition,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    if name == "shard":
        return ShardPartitioner(
            num_partitions=num_partitions,
            partition_by=label_key,
            num_shards_per_partition=shards_per_partition,
            seed=seed,
        )
    raise ValueError(f"Run config 'partitioner' must be one of {list(PARTITIONERS)}; got {name!r}")
