"""Datasets and Non-IID splits through flwr-datasets partitioners (no Flower app code)."""

from .federated import (
    ClientData,
    DataConfig,
    DatasetInfo,
    check_partitions,
    preflight,
    dataset_info,
    label_counts,
    load_client_data,
    load_test_data,
    partition_indices,
    partition_labels,
    plot_label_distribution,
    train_sizes,
    train_val_split,
    validation_size,
)
from .partitioners import PARTITIONERS, build_partitioner
from .sources import ImageArrays, SourceSpec, read_idx, resolve_source

__all__ = [
    "PARTITIONERS",
    "ClientData",
    "DataConfig",
    "DatasetInfo",
    "ImageArrays",
    "SourceSpec",
    "build_partitioner",
    "check_partitions",
    "preflight",
    "dataset_info",
    "label_counts",
    "load_client_data",
    "load_test_data",
    "partition_indices",
    "partition_labels",
    "plot_label_distribution",
    "read_idx",
    "resolve_source",
    "train_sizes",
    "train_val_split",
    "validation_size",
]
