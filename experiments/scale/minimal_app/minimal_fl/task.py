"""The model (same layer shapes as fl_app.model.Net for 28x28x1 input, 46,826 parameters)
and the data (identical partitions to partitions.load_client_data, computed once per
process and then sliced: no per-message partitioning)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        pad = 0 if image_size >= 20 else 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=5, padding=pad), nn.GroupNorm(4, 16),
            nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=5, padding=pad), nn.GroupNorm(4, 32),
            nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.classifier = nn.Sequential(nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


_SPLITS: dict = {}


def data_config(run_config) -> "object":
    from partitions import DataConfig

    return DataConfig(dataset=str(run_config["dataset"]), partitioner=str(run_config["partitioner"]),
                      alpha=0.5, classes_per_partition=2, shards_per_partition=2,
                      validation_fraction=float(run_config["validation-fraction"]),
                      seed=int(run_config["seed"]))


def client_data(run_config, partition_id: int, num_partitions: int):
    """(train, val) ImageArrays of a partition: the same arrays as
    partitions.load_client_data, from row indices computed once per process."""
    from partitions import ImageArrays, train_val_split
    from partitions.federated import INDEX_KEY, _partitioner

    cfg = data_config(run_config)
    key = (cfg, num_partitions)
    if key not in _SPLITS:
        # The repository's partitioner (same seed, same shuffle); each partition's row
        # indices read once as a NumPy column (vectorized), for every partition.
        source, partitioner = _partitioner(cfg, num_partitions)
        pixels = source._train_pixels  # idx / digits sources keep their pixels in NumPy
        # (p[:] reads the rows as one Arrow batch; np.asarray(p[column]) would iterate a
        # lazy datasets Column row by row, ~60 us a row)
        indices = [np.asarray(partitioner.load_partition(p)[:][INDEX_KEY], dtype=np.int64)
                   for p in range(num_partitions)]
        _SPLITS[key] = (pixels, indices)
    pixels, indices = _SPLITS[key]
    idx = indices[partition_id]
    split_seed = int(np.random.SeedSequence([cfg.seed, partition_id]).generate_state(1)[0])
    return train_val_split(ImageArrays(pixels.x[idx], pixels.y[idx]), cfg.validation_fraction,
                           split_seed)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int,
          lr: float, momentum: float, seed: int) -> tuple[float, int]:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    crit = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss_sum, steps = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(yt), generator=gen)
        for start in range(0, len(yt), batch_size):
            idx = order[start:start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = crit(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            steps += 1
    return loss_sum / max(len(yt), 1), steps


@torch.no_grad()
def test(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> tuple[float, float]:
    model.eval()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    crit = nn.CrossEntropyLoss(reduction="sum")
    loss, correct = 0.0, 0
    for s in range(0, len(yt), batch_size):
        logits = model(xt[s:s + batch_size])
        loss += float(crit(logits, yt[s:s + batch_size]))
        correct += int((logits.argmax(1) == yt[s:s + batch_size]).sum())
    return loss / max(len(yt), 1), correct / max(len(yt), 1)
