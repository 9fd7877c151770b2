"""A dataset cut into client partitions: what a client trains on, what the server tests on.

One code path for every source: the train split becomes a ``datasets.Dataset`` holding
the label column, is shuffled with the run's ``seed``, and is handed to a flwr-datasets
partitioner (``partitioner.dataset = ...``). Hub and parquet sources are loaded, and
a single parquet file divided into train/test, by flwr-datasets' ``FederatedDataset``;
in-memory sources (digits, IDX) keep their pixels in NumPy and give the partitioner
only labels plus an ``index`` column (the row in the train split; every source has it),
so no pixels are copied through Arrow.

The test split does not depend on ``seed`` (``DATA_SPLIT_SEED``), so runs with different
seeds are scored on the same images; ``seed`` changes the partitions, the train/validation
split of each client, the model's initial weights and the client sampling.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .partitioners import DIRICHLET_MIN_PARTITION_SIZE, PARTITIONERS, build_partitioner
from .sources import (
    IMAGE_KEYS,
    LABEL_KEYS,
    ImageArrays,
    SourceSpec,
    federated_dataset_args,
    find_column,
    hf_to_arrays,
    load_digits_split,
    load_idx_folder,
    resolve_source,
)

DATA_SPLIT_SEED = 0  # fixes the train/test division of sources that ship without one
INDEX_KEY = "index"


@dataclass(frozen=True)
class DataConfig:
    """The part of the run config that decides which samples a client holds."""

    dataset: str
    partitioner: str
    alpha: float
    classes_per_partition: int
    shards_per_partition: int
    validation_fraction: float
    seed: int

    def __post_init__(self) -> None:
        if self.partitioner not in PARTITIONERS:
            raise ValueError(
                f"Run config 'partitioner' must be one of {list(PARTITIONERS)}; got "
                f"{self.partitioner!r}"
            )
        resolve_source(self.dataset)  # raises on an unknown name or a missing file


@dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to know about a dataset."""

    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    num_train: int
    num_test: int


@dataclass(frozen=True)
class ClientData:
    """One client's partition, split into a training and a validation part."""

    train: ImageArrays
    val: ImageArrays


class _PreparedSource:
    """A loaded source: train labels (for partitioning), train pixels, and the test split."""

    def __init__(self, spec: SourceSpec) -> None:
        import datasets

        datasets.disable_progress_bars()
        self.spec = spec
        if spec.kind in ("digits", "idx"):
            if spec.kind == "digits":
                train, test = load_digits_split(DATA_SPLIT_SEED)
            else:
                from pathlib import Path

                train, test = load_idx_folder(Path(spec.location))
            self._train_pixels: ImageArrays | None = train
            self.label_key = "label"
            self.train_ds = datasets.Dataset.from_dict(
                {"label": train.y, INDEX_KEY: np.arange(len(train.y), dtype=np.int64)}
            )
            self.test = test
            self.num_classes = int(max(train.y.max(), test.y.max())) + 1
        else:
            from flwr_datasets import FederatedDataset

            # The partitioner passed here only satisfies FederatedDataset's signature; the
            # real one is built per DataConfig and given the train split below.
            fds = FederatedDataset(
                **federated_dataset_args(spec),
                partitioners={"train": 1},
                shuffle=True,
                seed=DATA_SPLIT_SEED,
            )
            train_ds = fds.load_split("train")
            test_ds = fds.load_split("test")
            columns = list(train_ds.column_names)
            self.label_key = find_column(columns, LABEL_KEYS, "label")
            self._image_key = find_column(columns, IMAGE_KEYS, "image")
            self._train_pixels = None
            self.train_ds = train_ds.add_column(INDEX_KEY, np.arange(len(train_ds), dtype=np.int64))
            self.test = hf_to_arrays(test_ds, self._image_key, self.label_key)
            feature = train_ds.features[self.label_key]
            self.num_classes = int(
                getattr(feature, "num_classes", 0)
                or max(int(np.max(train_ds[self.label_key])), int(self.test.y.max())) + 1
            )
        if len(self.train_ds) == 0 or len(self.test) == 0:
            raise ValueError(f"Dataset {spec.describe()} has an empty train or test split")

    @property
    def info(self) -> DatasetInfo:
        c, h, w = self.test.x.shape[1:]
        return DatasetInfo((int(c), int(h), int(w)), self.num_classes,
                           len(self.train_ds), len(self.test))

    @property
    def holds_pixels(self) -> bool:
        """True when the training pixels are in memory (digits, IDX, parquet): a
        partition is then a row-index array into them."""
        return self._train_pixels is not None

    def rows(self, idx: np.ndarray) -> ImageArrays:
        """Training pixels and labels at ``idx`` (only when ``holds_pixels``)."""
        return ImageArrays(self._train_pixels.x[idx], self._train_pixels.y[idx])

    def labels_at(self, idx: np.ndarray) -> np.ndarray:
        """Training labels at ``idx`` (only when ``holds_pixels``)."""
        return np.asarray(self._train_pixels.y[idx], dtype=np.int64)

    def arrays_of(self, part) -> ImageArrays:
        """Pixels and labels of a partition (a ``datasets.Dataset``)."""
        if self._train_pixels is not None:
            return self.rows(_column(part, INDEX_KEY))
        return hf_to_arrays(part, self._image_key, self.label_key)


def _column(part, key: str) -> np.ndarray:
    """One integer column of a ``datasets.Dataset`` as an array. ``part[:][key]`` reads
    the column at once (0.02 ms for a small partition); ``part[key]`` walks it row by
    row (0.67 ms), which at thousands of clients a round is most of a message's cost."""
    return np.asarray(part[:][key], dtype=np.int64)


def _offline_if_local(spec: SourceSpec) -> None:
    if spec.kind != "hub":
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


@lru_cache(maxsize=2)
def _prepared(spec: SourceSpec) -> _PreparedSource:
    _offline_if_local(spec)
    return _PreparedSource(spec)


@lru_cache(maxsize=4)
def _partitioner(cfg: DataConfig, num_partitions: int):
    source = _prepared(resolve_source(cfg.dataset))
    if num_partitions > len(source.train_ds):
        raise ValueError(
            f"num-partitions = {num_partitions} is more than the {len(source.train_ds)} "
            f"training samples of dataset {cfg.dataset!r}"
        )
    check_split_arithmetic(cfg, num_partitions, len(source.train_ds), source.num_classes)
    partitioner = build_partitioner(
        cfg.partitioner,
        num_partitions,
        label_key=source.label_key,
        alpha=cfg.alpha,
        classes_per_partition=cfg.classes_per_partition,
        shards_per_partition=cfg.shards_per_partition,
        seed=cfg.seed,
    )
    order = np.random.default_rng(cfg.seed).permutation(len(source.train_ds))
    partitioner.dataset = source.train_ds.select(order).flatten_indices()
    return source, partitioner


def check_split_arithmetic(cfg: DataConfig, num_partitions: int, num_train: int,
                           num_classes: int) -> None:
    """Splits that can never exist, refused before any partitioner runs (flwr-datasets
    would fail inside, e.g. with a ZeroDivisionError for too many shards)."""
    if num_partitions > num_train:
        raise ValueError(
            f"num-partitions = {num_partitions} is more than the {num_train} training samples "
            f"of dataset {cfg.dataset!r}")
    if cfg.partitioner == "pathological" and cfg.classes_per_partition > num_classes:
        raise ValueError(
            f"Run config 'classes-per-partition' = {cfg.classes_per_partition} exceeds the "
            f"{num_classes} classes of dataset {cfg.dataset!r}; accepted: 1 to {num_classes}")
    if cfg.partitioner == "shard":
        shards = num_partitions * cfg.shards_per_partition
        if shards > num_train:
            raise ValueError(
                f"Run config 'shards-per-partition' = {cfg.shards_per_partition} x "
                f"{num_partitions} partitions = {shards} shards, more than the {num_train} "
                f"training samples of dataset {cfg.dataset!r}; accepted: 1 to "
                f"{num_train // num_partitions}")
    if cfg.partitioner == "dirichlet":
        need = num_partitions * DIRICHLET_MIN_PARTITION_SIZE
        if need > num_train:
            raise ValueError(
                f"A Dirichlet split needs at least {DIRICHLET_MIN_PARTITION_SIZE} samples per "
                f"partition: {num_partitions} partitions need {need}, dataset "
                f"{cfg.dataset!r} has {num_train} training samples. Use fewer partitions")


def preflight(cfg: DataConfig, num_partitions: int | None = None, *,
              draw: bool = False) -> None:
    """The checks a run's split can take before the run: the source is readable and
    (given the number of partitions) the split is arithmetically possible; with
    ``draw``, a split that can fail only when drawn (Dirichlet: flwr-datasets redraws
    until every partition has its minimum size, and gives up after 10 attempts) is
    drawn and checked. For every sweep entry before the first."""
    try:
        info = dataset_info(cfg.dataset)
    except Exception as err:  # noqa: BLE001 - a corrupt file fails in many libraries' ways
        if "Run config 'dataset'" in str(err):
            raise
        raise ValueError(f"Run config 'dataset' = {cfg.dataset!r} could not be read: "
                         f"{type(err).__name__}: {err}") from err
    if num_partitions is not None:
        check_split_arithmetic(cfg, num_partitions, info.num_train, info.num_classes)
        if draw and cfg.partitioner == "dirichlet":
            check_partitions(cfg, num_partitions)


def dataset_info(dataset: str) -> DatasetInfo:
    """Image shape, number of classes and split sizes of a dataset."""
    return _prepared(resolve_source(dataset)).info


def load_test_data(dataset: str) -> ImageArrays:
    """The server's test split (independent of the run's seed)."""
    return _prepared(resolve_source(dataset)).test


def partition_labels(cfg: DataConfig, num_partitions: int) -> list[np.ndarray]:
    """The labels of every partition, in partition-id order (for checks and reports)."""
    source, partitioner = _partitioner(cfg, num_partitions)
    try:
        with warnings.catch_warnings():  # one warning per failed Dirichlet draw: the
            warnings.simplefilter("ignore", UserWarning)  # error below says it all
            if source.holds_pixels:  # the per-process index table: the split drawn once
                return [source.labels_at(idx) for idx in partition_indices(cfg, num_partitions)]
            return [
                _column(partitioner.load_partition(pid), source.label_key)
                for pid in range(num_partitions)
            ]
    except ValueError as err:  # e.g. Dirichlet could not meet its minimum size
        if cfg.partitioner == "dirichlet" and "attempts" in str(err):
            raise ValueError(
                f"Run config 'alpha' = {cfg.alpha:g}: flwr-datasets' DirichletPartitioner "
                f"could not give each of the {num_partitions} partitions of dataset "
                f"{cfg.dataset!r} at least {DIRICHLET_MIN_PARTITION_SIZE} samples ({err}). "
                "Raise 'alpha' or use fewer partitions") from None
        raise ValueError(
            f"Could not split dataset {cfg.dataset!r} into {num_partitions} partitions "
            f"with partitioner {cfg.partitioner!r} (alpha={cfg.alpha}, classes-per-partition="
            f"{cfg.classes_per_partition}, shards-per-partition={cfg.shards_per_partition}): "
            f"{err}"
        ) from err


def label_counts(cfg: DataConfig, num_partitions: int) -> dict[str, list[int]]:
    """Per partition, the number of samples of each label: {"<partition id>": [count of
    label 0, label 1, ...]}, counted from the split ``partition_labels`` draws (once per
    process: flwr-datasets' ``compute_counts`` loads every partition again, ~3 minutes
    at 10,000 partitions; tests/test_partitions.py checks the two agree)."""
    num_classes = dataset_info(cfg.dataset).num_classes
    return {str(pid): np.bincount(labels, minlength=num_classes).tolist()
            for pid, labels in enumerate(partition_labels(cfg, num_partitions))}


def plot_label_distribution(cfg: DataConfig, num_partitions: int, path) -> None:
    """flwr-datasets' ``plot_label_distributions`` of the split, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from flwr_datasets.visualization import plot_label_distributions

    source, partitioner = _partitioner(cfg, num_partitions)
    width = min(16.0, 4.0 + 0.12 * num_partitions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fig, _, _ = plot_label_distributions(
            partitioner, label_name=source.label_key, plot_type="bar", size_unit="absolute",
            legend=True, legend_title="label", figsize=(width, 4.0),
            title=f"{cfg.dataset}: {cfg.partitioner}, {num_partitions} partitions (seed {cfg.seed})",
        )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


@lru_cache(maxsize=2)
def partition_indices(cfg: DataConfig, num_partitions: int) -> tuple[np.ndarray, ...]:
    """The train-split row indices of every partition, in partition-id order (once per
    process and split: a simulation actor serves many partitions)."""
    _, partitioner = _partitioner(cfg, num_partitions)
    positions = _assigned_positions(partitioner, num_partitions)
    if positions is None:
        indices = tuple(_column(partitioner.load_partition(pid), INDEX_KEY)
                        for pid in range(num_partitions))
    else:
        # the whole column from Arrow at once (0.3 ms at 60,000 rows; the "numpy" format
        # takes ~3 s, a list ~0.5 s); the "arrow" format honours any indices mapping
        column = np.asarray(partitioner.dataset.with_format("arrow")[INDEX_KEY].to_numpy(),
                            dtype=np.int64)
        indices = tuple(column[rows] for rows in positions)
    for idx in indices:
        idx.flags.writeable = False
    return indices


def _assigned_positions(partitioner, num_partitions: int) -> list[np.ndarray] | None:
    """Each partition's row positions in ``partitioner.dataset``, as flwr-datasets assigns
    them, without a ``load_partition`` per partition (each is a ``datasets`` select or
    shard, ~0.5 ms: seconds at 10,000 partitions, paid by the server and by every
    simulation actor at start-up). ``IidPartitioner`` takes contiguous shards
    (``Dataset.shard(n, i, contiguous=True)``: ``np.array_split``'s boundaries); the
    Dirichlet, pathological and shard partitioners draw every partition's positions on
    their first ``load_partition`` into ``_partition_id_to_indices``, which is read here.
    None (so: one ``load_partition`` each) for any other partitioner or if that table is
    not there as expected. tests/test_partitions.py checks both against load_partition."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
        ShardPartitioner,
    )

    if type(partitioner) is IidPartitioner:
        return np.array_split(np.arange(len(partitioner.dataset)), num_partitions)
    if type(partitioner) not in (DirichletPartitioner, PathologicalPartitioner, ShardPartitioner):
        return None
    partitioner.load_partition(0)  # draws the assignment (and raises where it cannot)
    table = getattr(partitioner, "_partition_id_to_indices", None)
    if not isinstance(table, dict) or sorted(table) != list(range(num_partitions)):
        return None
    return [np.asarray(table[pid], dtype=np.int64) for pid in range(num_partitions)]


def check_partitions(cfg: DataConfig, num_partitions: int) -> list[int]:
    """Partition sizes; raises if any client would hold fewer than 2 samples."""
    sizes = [len(labels) for labels in partition_labels(cfg, num_partitions)]
    too_small = [pid for pid, n in enumerate(sizes) if n < 2]
    if too_small:
        raise ValueError(
            f"Partitions {too_small} of dataset {cfg.dataset!r} hold fewer than 2 samples "
            f"(sizes {sizes}); each client needs at least one training and one validation "
            f"sample. Use fewer partitions or a larger 'alpha'."
        )
    return sizes


def validation_size(n: int, fraction: float) -> int:
    """How many of a partition's ``n`` samples are held out for validation (>= 1, < n)."""
    if n < 2:
        raise ValueError(f"A partition of {n} samples cannot be split into train and validation")
    return min(max(1, int(round(fraction * n))), n - 1)


def train_sizes(sizes: list[int | None], fraction: float) -> list[int | None]:
    """The training-set size of each partition (what an honest client reports as
    ``num-examples``), from the partition sizes (None where a node kept its size private)."""
    return [None if n is None else n - validation_size(n, fraction) for n in sizes]


def train_val_split(data: ImageArrays, fraction: float, seed: int) -> ClientData:
    """Seeded split of one partition; at least one sample on each side."""
    n = len(data)
    n_val = validation_size(n, fraction)
    order = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = order[:n_val], order[n_val:]
    return ClientData(
        train=ImageArrays(data.x[train_idx], data.y[train_idx]),
        val=ImageArrays(data.x[val_idx], data.y[val_idx]),
    )


@lru_cache(maxsize=4)
def load_client_data(cfg: DataConfig, partition_id: int, num_partitions: int) -> ClientData:
    """Partition ``partition_id`` of ``num_partitions``, split into train and validation."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id must be in [0, {num_partitions}), got {partition_id}"
        )
    source, partitioner = _partitioner(cfg, num_partitions)
    if source.holds_pixels:  # every partition's rows at once, then a slice per client
        data = source.rows(partition_indices(cfg, num_partitions)[partition_id])
    else:
        data = source.arrays_of(partitioner.load_partition(partition_id))
    split_seed = int(np.random.SeedSequence([cfg.seed, partition_id]).generate_state(1)[0])
    return train_val_split(data, cfg.validation_fraction, split_seed)
