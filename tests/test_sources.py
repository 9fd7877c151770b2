"""Dataset loaders on small IDX and parquet files made here, and source resolution."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from partitions import (
    DataConfig,
    dataset_info,
    load_client_data,
    load_test_data,
    partition_labels,
    read_idx,
    resolve_source,
)
from partitions.sources import FASHION_MNIST_DEBIAN_DIR


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def make_images(n: int, seed: int, size: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Images whose mean brightness encodes the label, so a loader mix-up shows."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    images = (labels[:, None, None] * 60 + rng.integers(0, 10, (n, size, size))).astype(np.uint8)
    return images, labels.astype(np.uint8)


@pytest.fixture
def idx_folder(tmp_path) -> Path:
    folder = tmp_path / "idx"
    folder.mkdir()
    x_tr, y_tr = make_images(40, 0)
    x_te, y_te = make_images(12, 1)
    write_idx(folder / "train-images-idx3-ubyte.gz", x_tr)  # gzipped and plain both work
    write_idx(folder / "train-labels-idx1-ubyte.gz", y_tr)
    write_idx(folder / "t10k-images-idx3-ubyte", x_te)
    write_idx(folder / "t10k-labels-idx1-ubyte", y_te)
    return folder


def test_read_idx_round_trips(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)


def test_read_idx_rejects_truncated_file(tmp_path):
    array = np.zeros((2, 3, 4), dtype=np.uint8)
    write_idx(tmp_path / "a", array)
    (tmp_path / "a").write_bytes((tmp_path / "a").read_bytes()[:-5])
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "a")


def test_idx_folder_loads_as_dataset(idx_folder):
    spec = resolve_source(str(idx_folder))
    assert spec.kind == "idx"
    info = dataset_info(str(idx_folder))
    assert info.image_shape == (1, 12, 12) and info.num_classes == 4
    assert (info.num_train, info.num_test) == (40, 12)
    test = load_test_data(str(idx_folder))
    # brightness encodes the label: pixels in [-1, 1] rise with the label
    means = [test.x[test.y == c].mean() for c in range(4)]
    assert means == sorted(means)
    cfg = DataConfig(str(idx_folder), "pathological", 0.5, 1, 2, 0.2, 0)
    data = load_client_data(cfg, 1, 4)
    assert len(np.unique(np.concatenate([data.train.y, data.val.y]))) == 1


def write_parquet(path: Path, n: int, seed: int) -> None:
    import datasets
    from PIL import Image

    images, labels = make_images(n, seed)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(num_classes=4)})
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(img) for img in images], "label": labels.astype(int)},
        features=features,
    )
    ds.to_parquet(str(path))


def test_parquet_folder_goes_through_federated_dataset(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    write_parquet(folder / "train-00000.parquet", 40, 0)
    write_parquet(folder / "test-00000.parquet", 12, 1)
    spec = resolve_source(str(folder))
    assert spec.kind == "parquet"
    info = dataset_info(str(folder))
    assert (info.num_train, info.num_test, info.num_classes) == (40, 12, 4)
    assert info.image_shape == (1, 12, 12)
    cfg = DataConfig(str(folder), "iid", 0.5, 2, 2, 0.3, 0)
    sizes = [len(l) for l in partition_labels(cfg, 4)]
    assert sizes == [10, 10, 10, 10]
    data = load_client_data(cfg, 0, 4)
    assert (len(data.train), len(data.val)) == (7, 3)
    means = [data.train.x[data.train.y == c].mean() for c in np.unique(data.train.y)]
    assert means == sorted(means)


def test_single_parquet_file_is_divided_into_train_and_test(tmp_path):
    path = tmp_path / "all.parquet"
    write_parquet(path, 50, 0)
    info = dataset_info(str(path))
    assert (info.num_train, info.num_test) == (40, 10)


@pytest.mark.parametrize("value, message", [
    ("cifar-100-please", "must be one of"),
    ("/no/such/folder", "no such file"),
    ("./missing.parquet", "no such file"),
    ("", "must be one of"),
])
def test_bad_dataset_values_are_refused(value, message):
    with pytest.raises(ValueError, match=message):
        resolve_source(value)


def test_existing_folder_without_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="neither a .parquet file"):
        resolve_source(str(tmp_path))


def test_hub_ids_resolve_without_loading():
    assert resolve_source("ylecun/mnist").kind == "hub"


@pytest.mark.skipif(not FASHION_MNIST_DEBIAN_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_comes_from_the_debian_package():
    assert resolve_source("fashion-mnist").kind == "idx"
    info = dataset_info("fashion-mnist")
    assert (info.num_train, info.num_test, info.image_shape) == (60000, 10000, (1, 28, 28))
