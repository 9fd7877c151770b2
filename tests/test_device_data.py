"""A SuperNode's own data (node config ``data-path``): parquet or IDX, checked against the
run's dataset, split like a benchmark partition, and reported to the server."""

from __future__ import annotations

import os

import numpy as np
import pytest

from partitions import DatasetInfo
from partitions.device import load_device_data, read_device_data
from partitions.federated import validation_size

DIGITS = DatasetInfo((1, 8, 8), 10, 0, 0)


def write_idx(folder, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST-format IDX files (unsigned bytes) for ``images`` (N, H, W) and ``labels``."""
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (folder / "train-images-idx3-ubyte").write_bytes(
        bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, h, w))
        + images.astype(np.uint8).tobytes())
    (folder / "train-labels-idx1-ubyte").write_bytes(
        bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labels.astype(np.uint8).tobytes())


def digits_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 8, 8)), rng.integers(0, 10, size=n)


def test_an_idx_folder_is_read_scaled_and_split_like_a_partition(tmp_path):
    images, labels = digits_like(50)
    write_idx(tmp_path / "node", images, labels)
    data = load_device_data(str(tmp_path / "node"), DIGITS, validation_fraction=0.1, seed=3)
    assert len(data.train) + len(data.val) == 50
    assert len(data.val) == validation_size(50, 0.1)
    assert data.train.x.shape[1:] == (1, 8, 8) and data.train.x.dtype == np.float32
    assert data.train.x.min() >= -1.0 and data.train.x.max() <= 1.0
    # every sample kept exactly once, with its own label
    x = np.concatenate([data.train.x, data.val.x])[:, 0]
    y = np.concatenate([data.train.y, data.val.y])
    pixels = np.rint((x.astype(np.float64) * 0.5 + 0.5) * 255).astype(int)  # undo the scaling
    want = sorted((tuple(img.ravel()), int(l)) for img, l in zip(images, labels))
    got = sorted((tuple(img.ravel()), int(l)) for img, l in zip(pixels, y))
    assert got == want


def test_a_parquet_file_is_read_like_the_parquet_sources(tmp_path):
    import datasets

    images, labels = digits_like(30, seed=1)
    path = tmp_path / "node.parquet"
    datasets.Dataset.from_dict({"image": [img.astype(np.uint8) for img in images],
                                "label": labels.astype(np.int64)}).to_parquet(str(path))
    data = read_device_data(path)
    assert data.x.shape == (30, 1, 8, 8)
    np.testing.assert_allclose(data.x[:, 0], (images / 255.0 - 0.5) / 0.5, atol=1e-6)
    assert data.y.tolist() == labels.tolist()


@pytest.mark.parametrize("change, fragment", [
    ("missing", "cannot be read"),
    ("shape", "images of shape (1, 6, 6); the run's dataset (and model) needs (1, 8, 8)"),
    ("labels", "labels in [0, 12]; the run's dataset has 10 classes"),
    ("empty-folder", "neither a .parquet file nor a folder"),
])
def test_bad_device_data_is_named(tmp_path, change, fragment):
    folder = tmp_path / "node"
    if change == "shape":
        write_idx(folder, np.zeros((5, 6, 6)), np.zeros(5))
    elif change == "labels":
        write_idx(folder, np.zeros((5, 8, 8)), np.array([0, 1, 2, 12, 3]))
    elif change == "empty-folder":
        folder.mkdir()
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        load_device_data(str(folder), DIGITS, validation_fraction=0.1, seed=0)


def test_a_changed_file_is_read_again(tmp_path):
    folder = tmp_path / "node"
    write_idx(folder, *digits_like(20))
    first = load_device_data(str(folder), DIGITS, validation_fraction=0.1, seed=0)
    write_idx(folder, *digits_like(40, seed=2))
    later = os.stat(folder / "train-images-idx3-ubyte").st_mtime_ns + 10**9
    os.utime(folder / "train-images-idx3-ubyte", ns=(later, later))
    second = load_device_data(str(folder), DIGITS, validation_fraction=0.1, seed=0)
    assert len(first.train) + len(first.val) == 20
    assert len(second.train) + len(second.val) == 40


def test_the_server_takes_sizes_and_label_counts_from_the_nodes():
    from fl_app.nodes import NodeDirectory

    nodes = NodeDirectory(grid=None)
    nodes.partition = {11: (0, 3), 12: (1, 3), 13: (2, 3)}
    nodes.own_data_of = {11: (30, [10, 20]), 12: (5, [0, 0, 5])}  # 13: a benchmark partition
    assert nodes.own_data([11, 12, 13], 3, num_classes=3) == {0: (30, [10, 20, 0]),
                                                              1: (5, [0, 0, 5])}
    nodes.partition[12] = (0, 3)  # two nodes claim partition 0: the first to answer keeps it
    assert nodes.own_data([11, 12, 13], 3, num_classes=3) == {0: (30, [10, 20, 0])}
    nodes.partition = {12: (0, 3), 11: (0, 3), 13: (2, 3)}  # now 12 answered first
    assert nodes.own_data([11, 12, 13], 3, num_classes=3) == {0: (5, [0, 0, 5])}
    nodes.partition = {11: (0, 3), 12: (1, 3), 13: (2, 3)}
    nodes.own_data_of[12] = (1, [1])
    with pytest.raises(ValueError, match="holds 1 sample"):
        nodes.own_data([11, 12, 13], 3, num_classes=3)
    nodes.own_data_of = {}
    assert nodes.own_data([11, 12, 13], 3, num_classes=3) == {}


def test_the_partition_cache_serves_later_messages_and_never_a_stale_entry(tmp_path, make_config):
    from partitions import load_client_data
    from partitions.device import cached_client_data

    cfg = make_config().data
    calls = []

    def load():
        calls.append(1)
        return load_client_data(cfg, 1, 4)

    first = cached_client_data(str(tmp_path), cfg, 1, 4, load)
    second = cached_client_data(str(tmp_path), cfg, 1, 4, load)  # a later process
    assert len(calls) == 1
    # Later messages memory-map the entry (nothing decoded), writable for PyTorch.
    assert isinstance(second.train.x, np.memmap) and second.train.x.flags.writeable
    np.testing.assert_array_equal(first.train.x, second.train.x)
    np.testing.assert_array_equal(first.val.y, second.val.y)
    other = make_config(seed=1).data  # another split: another entry
    cached_client_data(str(tmp_path), other, 1, 4, lambda: (calls.append(1), load_client_data(other, 1, 4))[1])
    assert len(calls) == 2
    entries = list(tmp_path.glob("partition-*/train_x.npy"))
    assert len(entries) == 2
    for entry in entries:  # a damaged entry is rebuilt
        entry.write_bytes(b"torn write")
    third = cached_client_data(str(tmp_path), cfg, 1, 4, load)
    assert len(calls) == 3 and len(third.train) == len(first.train)
    np.testing.assert_array_equal(third.train.x, first.train.x)
    assert not list(tmp_path.glob("*.tmp"))
