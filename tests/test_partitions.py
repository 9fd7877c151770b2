"""Partitions: sizes add up, no overlap, skew follows alpha, #C is exact, seeds reproduce."""

from __future__ import annotations

import numpy as np
import pytest

from partitions import (
    DataConfig,
    ImageArrays,
    check_partitions,
    dataset_info,
    load_client_data,
    partition_indices,
    partition_labels,
    train_val_split,
)


def data_config(**kw) -> DataConfig:
    base = dict(dataset="digits", partitioner="iid", alpha=0.5, classes_per_partition=2,
                shards_per_partition=2, validation_fraction=0.1, seed=0)
    return DataConfig(**{**base, **kw})


def label_skew(labels: list[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each partition's label mix and the global one."""
    everything = np.concatenate(labels)
    global_mix = np.bincount(everything, minlength=num_classes) / len(everything)
    return float(np.mean([
        0.5 * np.abs(np.bincount(l, minlength=num_classes) / len(l) - global_mix).sum()
        for l in labels
    ]))


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological", "shard"])
def test_partitions_cover_train_split_without_overlap(partitioner):
    # Prepare
    cfg = data_config(partitioner=partitioner)
    n_train = dataset_info("digits").num_train
    # Execute
    parts = partition_indices(cfg, 5)
    # Assert: disjoint, and every training sample used once, except the remainder that
    # ShardPartitioner drops (fewer than one sample per shard) and the classes that
    # PathologicalPartitioner leaves unassigned
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined))
    assert joined.min() >= 0 and joined.max() < n_train
    if partitioner in ("iid", "dirichlet"):
        assert len(joined) == n_train
    elif partitioner == "shard":
        assert n_train - 5 * 2 < len(joined) <= n_train
    assert sum(check_partitions(cfg, 5)) == len(joined)


def test_smaller_alpha_gives_more_label_skew():
    skews = {alpha: label_skew(partition_labels(data_config(partitioner="dirichlet", alpha=alpha), 5), 10)
             for alpha in (0.1, 1.0, 100.0)}
    assert skews[0.1] > skews[1.0] > skews[100.0]
    assert skews[100.0] < 0.1 < 0.4 < skews[0.1]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_gives_exactly_k_classes(k):
    labels = partition_labels(data_config(partitioner="pathological", classes_per_partition=k), 10)
    assert [len(np.unique(l)) for l in labels] == [k] * 10


def test_iid_is_balanced_in_size_and_labels():
    labels = partition_labels(data_config(partitioner="iid"), 5)
    sizes = [len(l) for l in labels]
    assert max(sizes) - min(sizes) <= 1
    assert label_skew(labels, 10) < 0.1


def test_same_seed_same_split_other_seed_other_split():
    a = partition_indices(data_config(partitioner="dirichlet", seed=3), 4)
    b = partition_indices(data_config(partitioner="dirichlet", seed=3), 4)
    c = partition_indices(data_config(partitioner="dirichlet", seed=4), 4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_partitions_change_with_seed():
    a = partition_indices(data_config(seed=0), 4)
    b = partition_indices(data_config(seed=1), 4)
    assert not np.array_equal(a[0], b[0])


def test_client_data_is_partition_split_into_train_and_validation():
    cfg = data_config(partitioner="dirichlet", validation_fraction=0.25)
    labels = partition_labels(cfg, 4)[2]
    data = load_client_data(cfg, 2, 4)
    assert len(data.train) + len(data.val) == len(labels)
    assert len(data.val) == round(0.25 * len(labels))
    assert np.array_equal(np.sort(np.concatenate([data.train.y, data.val.y])), np.sort(labels))
    assert data.train.x.dtype == np.float32 and data.train.x.shape[1:] == (1, 8, 8)
    assert -1.0 <= data.train.x.min() and data.train.x.max() <= 1.0


def test_train_val_split_is_disjoint_and_seeded():
    arrays = ImageArrays(np.arange(20, dtype=np.float32).reshape(20, 1, 1, 1), np.arange(20))
    a = train_val_split(arrays, 0.3, seed=1)
    b = train_val_split(arrays, 0.3, seed=1)
    assert len(a.val) == 6 and len(a.train) == 14
    assert set(a.val.y).isdisjoint(a.train.y)
    assert np.array_equal(a.val.y, b.val.y)
    with pytest.raises(ValueError, match="cannot be split"):
        train_val_split(ImageArrays(arrays.x[:1], arrays.y[:1]), 0.3, seed=1)


def test_more_partitions_than_samples_is_refused():
    with pytest.raises(ValueError, match="more than the 1437 training samples"):
        check_partitions(data_config(), 5000)


def test_partition_too_small_for_validation_is_refused():
    with pytest.raises(ValueError, match="fewer than 2 samples"):
        check_partitions(data_config(), 1000)


def test_pathological_with_more_classes_than_dataset_is_refused():
    with pytest.raises(ValueError, match="classes-per-partition"):
        partition_labels(data_config(partitioner="pathological", classes_per_partition=11), 5)


def test_partition_id_out_of_range_is_refused():
    with pytest.raises(ValueError, match="partition-id"):
        load_client_data(data_config(), 5, 5)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_a_client_slices_the_same_rows_as_flwr_datasets_load_partition(partitioner):
    """load_client_data takes each partition's rows from one per-process index table;
    they must be exactly the rows flwr-datasets' load_partition gives."""
    from partitions.federated import (_partitioner, load_client_data, partition_labels,
                                      train_val_split)

    cfg = data_config(partitioner=partitioner)
    source, partitioner_ = _partitioner(cfg, 5)
    for pid in range(5):
        direct = source.arrays_of(partitioner_.load_partition(pid))
        seed = int(np.random.SeedSequence([cfg.seed, pid]).generate_state(1)[0])
        expected = train_val_split(direct, cfg.validation_fraction, seed)
        got = load_client_data(cfg, pid, 5)
        np.testing.assert_array_equal(partition_labels(cfg, 5)[pid], direct.y)
        for a, b in ((got.train, expected.train), (got.val, expected.val)):
            np.testing.assert_array_equal(a.x, b.x)
            np.testing.assert_array_equal(a.y, b.y)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_label_counts_agree_with_flwr_datasets_compute_counts(partitioner):
    """summary.json's label counts are counted from the split the run uses; flwr-datasets'
    own compute_counts (which loads every partition again) must give the same numbers."""
    from flwr_datasets.metrics import compute_counts

    from partitions import label_counts
    from partitions.federated import _partitioner

    cfg = data_config(partitioner=partitioner, alpha=0.3)
    counts = label_counts(cfg, 7)
    source, partitioner_ = _partitioner(cfg, 7)
    frame = compute_counts(partitioner_, column_name=source.label_key)
    frame = frame.reindex(columns=list(range(10)), fill_value=0)
    expected = {str(pid): [int(v) for v in row] for pid, row in zip(frame.index, frame.to_numpy())}
    assert counts == expected
    if partitioner != "pathological":  # which leaves out classes no partition drew
        assert sum(map(sum, counts.values())) == dataset_info("digits").num_train


@pytest.mark.parametrize("partitioner,n", [("iid", 7), ("iid", 1), ("dirichlet", 6),
                                           ("pathological", 5), ("shard", 4)])
def test_the_split_read_at_once_is_flwr_datasets_load_partition(partitioner, n):
    """partition_indices reads every partition's rows from the partitioner's own
    assignment (IID: contiguous shards; the others: the table their first load_partition
    draws) instead of one load_partition each; it must give exactly load_partition's rows,
    in order, for every partition."""
    from partitions.federated import INDEX_KEY, _assigned_positions, _column, _partitioner

    cfg = data_config(partitioner=partitioner, alpha=0.3, seed=5)
    got = partition_indices(cfg, n)
    _, partitioner_ = _partitioner(cfg, n)
    assert _assigned_positions(partitioner_, n) is not None  # the fast path was taken
    assert len(got) == n
    for pid in range(n):
        np.testing.assert_array_equal(got[pid], _column(partitioner_.load_partition(pid), INDEX_KEY))
