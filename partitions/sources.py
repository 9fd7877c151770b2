"""Dataset sources: where the images come from, and how they become arrays.

Accepted values of the run-config key ``dataset``:

- ``digits``: scikit-learn's 1,797 8x8 digit images, shipped inside scikit-learn
  (the offline default). It has no test split, so a stratified, seeded 20 % is held
  out as the test split.
- ``fashion-mnist``: the full Fashion-MNIST (60,000 train / 10,000 test), read from the
  IDX files of Debian's ``dataset-fashion-mnist`` package when present, else from the
  Hugging Face hub (``zalando-datasets/fashion_mnist``, needs network).
- a local folder of IDX files (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-
  ubyte[.gz]``, ``t10k-...``): MNIST, Fashion-MNIST, or anything in that format;
- a local ``.parquet`` file (split 80/20 into train and test, seeded), or a folder holding
  ``train*.parquet`` and ``test*.parquet``: loaded through flwr-datasets'
  ``FederatedDataset`` exactly as a hub dataset is;
- any Hugging Face hub id (``owner/name``) with a ``train`` and a ``test`` split, through
  ``FederatedDataset``.

This module knows nothing about Flower apps; it turns a name into labelled images.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
NAMED_DATASETS = ("digits", "fashion-mnist")
ACCEPTED_DATASETS = (
    "'digits', 'fashion-mnist', a folder of IDX files, a .parquet file or a folder of "
    "train*/test*.parquet files, or a Hugging Face hub id such as 'ylecun/mnist'"
)
IMAGE_KEYS = ("image", "img", "pixels")
LABEL_KEYS = ("label", "labels", "fine_label", "target")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

SourceKind = Literal["digits", "idx", "parquet", "hub"]


@dataclass(frozen=True)
class SourceSpec:
    """A resolved dataset source: what kind it is and where it lives."""

    kind: SourceKind
    location: str = ""  # a path for idx/parquet, a hub id for hub, "" for digits

    def describe(self) -> str:
        return self.kind if not self.location else f"{self.kind}:{self.location}"


@dataclass(frozen=True)
class ImageArrays:
    """Images as float32 ``(N, C, H, W)`` scaled to [-1, 1], labels as int64 ``(N,)``."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(
                f"ImageArrays needs x of shape (N, C, H, W) and y of shape (N,), got "
                f"{self.x.shape} and {self.y.shape}"
            )

    def __len__(self) -> int:
        return len(self.y)


def resolve_source(dataset: str) -> SourceSpec:
    """Map the ``dataset`` run-config value to a source, or raise naming what is accepted.

    Local paths win over hub ids; a value that looks like a path (starts with ``/``,
    ``.``, ``~`` or ends with ``.parquet``) but does not exist is an error, not a hub id.
    """
    if not isinstance(dataset, str) or not dataset.strip():
        raise ValueError(f"Run config 'dataset' must be one of {ACCEPTED_DATASETS}; got {dataset!r}")
    value = dataset.strip()
    if value == "digits":
        return SourceSpec("digits")
    if value == "fashion-mnist":
        if _has_idx_files(FASHION_MNIST_DEBIAN_DIR):
            return SourceSpec("idx", str(FASHION_MNIST_DEBIAN_DIR))
        return SourceSpec("hub", FASHION_MNIST_HUB_ID)

    path = Path(value).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".parquet":
            return SourceSpec("parquet", str(path.resolve()))
        if path.is_dir() and _has_idx_files(path):
            return SourceSpec("idx", str(path.resolve()))
        if path.is_dir() and _parquet_split_files(path) is not None:
            return SourceSpec("parquet", str(path.resolve()))
        raise ValueError(
            f"Run config 'dataset' = {value!r} exists but is neither a .parquet file, a "
            "folder with train/test IDX files (train-images-idx3-ubyte[.gz], "
            "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
            "t10k-labels-idx1-ubyte[.gz]) nor a folder with train*.parquet and "
            "test*.parquet files."
        )
    if value.startswith(("/", ".", "~")) or value.endswith(".parquet"):
        raise ValueError(f"Run config 'dataset': no such file or folder: {value!r}")
    if _HUB_ID.match(value):
        return SourceSpec("hub", value)
    raise ValueError(f"Run config 'dataset' must be one of {ACCEPTED_DATASETS}; got {value!r}")


# ---------------------------------------------------------------------------- IDX
def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _has_idx_files(folder: Path) -> bool:
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    return folder.is_dir() and all(_idx_file(folder, s) is not None for s in stems)


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped): the MNIST format, unsigned bytes only."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported (type 0x{raw[2]:02x})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - offset != expected:
        raise ValueError(
            f"{path}: header says {dims} ({expected} bytes) but the file holds "
            f"{len(raw) - offset} bytes of data"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_idx_folder(folder: Path) -> tuple[ImageArrays, ImageArrays]:
    """Train and test arrays from an MNIST-format IDX folder."""
    splits = []
    for prefix in ("train", "t10k"):
        images = read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"))  # type: ignore[arg-type]
        labels = read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte"))  # type: ignore[arg-type]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not match"
            )
        splits.append(ImageArrays(scale_images(images[:, None], 255.0), labels.astype(np.int64)))
    return splits[0], splits[1]


# ---------------------------------------------------------------------------- digits
def load_digits_split(seed: int, test_fraction: float = 0.2) -> tuple[ImageArrays, ImageArrays]:
    """scikit-learn's digits with a stratified, seeded train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    return (ImageArrays(scale_images(x_tr, 16.0), y_tr),
            ImageArrays(scale_images(x_te, 16.0), y_te))


def scale_images(images: np.ndarray, max_value: float) -> np.ndarray:
    """Map pixel values in [0, max_value] to float32 in [-1, 1]."""
    return (images.astype(np.float32) / np.float32(max_value) - 0.5) / 0.5


# ---------------------------------------------------------------------------- hub / parquet
def _parquet_split_files(folder: Path) -> dict[str, list[str]] | None:
    train = sorted(str(p) for p in folder.glob("train*.parquet"))
    test = sorted(str(p) for p in folder.glob("test*.parquet"))
    return {"train": train, "test": test} if train and test else None


def federated_dataset_args(spec: SourceSpec) -> dict:
    """Keyword arguments for ``FederatedDataset`` (without partitioners) for a source."""
    if spec.kind == "hub":
        return {"dataset": spec.location}
    if spec.kind == "parquet":
        path = Path(spec.location)
        if path.is_dir():
            return {"dataset": "parquet", "data_files": _parquet_split_files(path)}
        # One file: hold out a seeded 20 % as the test split (after FederatedDataset's
        # seeded shuffle), through flwr-datasets' own Divider.
        from flwr_datasets.preprocessor import Divider

        return {
            "dataset": "parquet",
            "data_files": {"train": str(path)},
            "preprocessor": Divider(divide_config={"train": 0.8, "test": 0.2},
                                    divide_split="train"),
        }
    raise ValueError(f"{spec.kind} sources are not read through FederatedDataset")


def find_column(column_names: list[str], candidates: tuple[str, ...], what: str) -> str:
    for name in candidates:
        if name in column_names:
            return name
    raise ValueError(
        f"Dataset has no {what} column: looked for {list(candidates)}, found columns "
        f"{column_names}"
    )


def hf_to_arrays(ds, image_key: str, label_key: str) -> ImageArrays:
    """Convert a ``datasets.Dataset`` of images (PIL or arrays) and labels to arrays."""
    images = [np.asarray(img) for img in ds[image_key]]
    x = np.stack(images) if images else np.zeros((0, 1, 1), dtype=np.uint8)
    if x.ndim == 3:  # (N, H, W) grayscale
        x = x[:, None]
    elif x.ndim == 4:  # (N, H, W, C) -> (N, C, H, W)
        x = np.transpose(x, (0, 3, 1, 2))
    else:
        raise ValueError(f"Images must be 2-D (grayscale) or 3-D (H, W, C); got {x.shape[1:]}")
    max_value = 255.0 if x.dtype == np.uint8 else float(max(x.max(initial=0), 1.0))
    return ImageArrays(scale_images(x, max_value), np.asarray(ds[label_key], dtype=np.int64))
