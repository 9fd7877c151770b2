"""A device's own data: what a SuperNode trains on when its node config names ``data-path``.

In deployment a SuperNode either holds a benchmark partition (``partition-id`` of
``num-partitions`` of the run's ``dataset``, the same split as in simulation) or its own
data: ``data-path`` = a ``.parquet`` file (image and label columns, as the hub and
parquet sources) or an MNIST-format IDX folder (``train-images-idx3-ubyte[.gz]`` and
``train-labels-idx1-ubyte[.gz]``; test files are not needed). Every row is this device's;
the preprocessing is the same as for the benchmark sources (``sources.scale_images``:
pixels to [-1, 1]) and so is the seeded train/validation split (``train_val_split``).

A device's data must match the run's model: the same image shape and labels in
[0, num_classes) of the run's ``dataset`` (whose test split the server evaluates on).
Loaded data is cached per process, keyed by the file's path, size and modification time
and by the split's settings, so a changed file is read again.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from .federated import ClientData, DatasetInfo, train_val_split
from .sources import (
    IMAGE_KEYS,
    LABEL_KEYS,
    ImageArrays,
    _idx_file,
    find_column,
    hf_to_arrays,
    read_idx,
    scale_images,
)

DATA_PATH = "data-path"  # node-config key


def read_device_data(path: Path) -> ImageArrays:
    """All of a device's samples, preprocessed as the benchmark sources are."""
    if path.is_file() and path.suffix == ".parquet":
        import datasets

        datasets.disable_progress_bars()
        ds = datasets.Dataset.from_parquet(str(path))
        columns = list(ds.column_names)
        return hf_to_arrays(ds, find_column(columns, IMAGE_KEYS, "image"),
                            find_column(columns, LABEL_KEYS, "label"))
    if path.is_dir():
        images_file = _idx_file(path, "train-images-idx3-ubyte")
        labels_file = _idx_file(path, "train-labels-idx1-ubyte")
        if images_file is not None and labels_file is not None:
            images, labels = read_idx(images_file), read_idx(labels_file)
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise ValueError(f"{path}: images {images.shape} and labels {labels.shape} "
                                 "do not match")
            return ImageArrays(scale_images(images[:, None], 255.0), labels.astype(np.int64))
    raise ValueError(f"Node config '{DATA_PATH}' = {str(path)!r} is neither a .parquet file "
                     "nor a folder with train-images-idx3-ubyte[.gz] and "
                     "train-labels-idx1-ubyte[.gz]")


@lru_cache(maxsize=4)
def _cached(path: str, size: int, mtime_ns: int, validation_fraction: float,
            seed: int) -> ClientData:
    data = read_device_data(Path(path))
    if len(data) < 2:
        raise ValueError(f"Node config '{DATA_PATH}' = {path!r} holds {len(data)} sample(s); "
                         "a client needs at least one training and one validation sample")
    return train_val_split(data, validation_fraction, seed)


def load_device_data(data_path: str, info: DatasetInfo, *, validation_fraction: float,
                     seed: int) -> ClientData:
    """This device's data, split into train and validation, checked against the run's
    dataset ``info`` (image shape, number of classes)."""
    path = Path(str(data_path)).expanduser()
    try:
        stat = path.stat()
    except OSError as err:
        raise ValueError(f"Node config '{DATA_PATH}' = {data_path!r} cannot be read: "
                         f"{err.strerror or err}") from None
    if path.is_dir():  # a folder's files decide: key on the newest of them
        stat = max((p.stat() for p in path.iterdir() if p.is_file()), key=lambda s: s.st_mtime_ns,
                   default=stat)
    data = _cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns,
                   float(validation_fraction), int(seed))
    shape = tuple(data.train.x.shape[1:])
    if shape != tuple(info.image_shape):
        raise ValueError(f"Node config '{DATA_PATH}' = {data_path!r} holds images of shape "
                         f"{shape}; the run's dataset (and model) needs {tuple(info.image_shape)}")
    labels = np.concatenate([data.train.y, data.val.y])
    if labels.min() < 0 or labels.max() >= info.num_classes:
        raise ValueError(f"Node config '{DATA_PATH}' = {data_path!r} has labels in "
                         f"[{labels.min()}, {labels.max()}]; the run's dataset has "
                         f"{info.num_classes} classes (0 to {info.num_classes - 1})")
    return data


# ---------------------------------------------------------------------------- disk cache
CACHE_VERSION = 2  # bump when the preprocessing or the format changes: old entries are ignored
CACHE_ARRAYS = ("train_x", "train_y", "val_x", "val_y")


def _source_stamp(location: str) -> str:
    """Path, size and modification time of a local source (empty for digits and hub ids)."""
    path = Path(location) if location else None
    if path is None or not path.exists():
        return location
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return ";".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def _read_entry(folder: Path) -> ClientData:
    """A cache entry's arrays, memory-mapped copy-on-write (``mmap_mode="c"``): nothing is
    read or decoded until a batch touches it, the pages come from the OS's page cache
    (shared by every message's process), and the arrays stay writable for PyTorch."""
    x = {name: np.load(folder / f"{name}.npy", mmap_mode="c", allow_pickle=False)
         for name in CACHE_ARRAYS}
    if len(x["train_x"]) != len(x["train_y"]) or len(x["val_x"]) != len(x["val_y"]):
        raise ValueError(f"{folder}: arrays of different lengths")
    return ClientData(train=ImageArrays(x["train_x"], x["train_y"]),
                      val=ImageArrays(x["val_x"], x["val_y"]))


def cached_client_data(cache_dir: str, cfg, partition_id: int, num_partitions: int, load):
    """``load()`` (a benchmark partition's ClientData) through a cache on the node's disk.

    In deployment every message runs in a fresh ClientApp process, so the per-process
    cache is lost and each message would load the whole dataset and split it again; with
    node config ``cache-dir`` the partition is written once as plain ``.npy`` arrays (a
    folder per entry, written under a temporary name, then renamed: a reader never sees a
    partial entry) and later messages memory-map them (``_read_entry``) instead of
    decoding anything. The key covers the source (path, size and modification time of
    its files), every split setting, the partition and the cache format, so a changed
    dataset or config is never served stale.
    """
    import hashlib
    import json
    import shutil

    from .sources import resolve_source

    spec = resolve_source(cfg.dataset)
    key = json.dumps({"v": CACHE_VERSION, "source": spec.describe(),
                      "stamp": _source_stamp(spec.location), "cfg": repr(cfg),
                      "pid": partition_id, "num": num_partitions}, sort_keys=True)
    folder = Path(cache_dir).expanduser()
    entry = folder / f"partition-{hashlib.sha256(key.encode()).hexdigest()[:32]}"
    if entry.is_dir():
        try:
            return _read_entry(entry)
        except (OSError, ValueError):
            shutil.rmtree(entry, ignore_errors=True)  # a damaged entry is rebuilt below
    data = load()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
    tmp.mkdir()
    arrays = {"train_x": data.train.x, "train_y": data.train.y, "val_x": data.val.x,
              "val_y": data.val.y}
    for name in CACHE_ARRAYS:
        np.save(tmp / f"{name}.npy", np.ascontiguousarray(arrays[name]), allow_pickle=False)
    try:
        os.rename(tmp, entry)
    except OSError:  # another process wrote the same entry first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return data
