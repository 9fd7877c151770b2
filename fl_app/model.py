"""The model: a small LeNet-style CNN with GroupNorm (Opacus cannot privatize BatchNorm).

For 28x28 grayscale input (MNIST, Fashion-MNIST) it has 46,826 parameters: two 5x5
convolutions (16 and 32 channels, each followed by GroupNorm, ReLU and 2x2 max-pooling),
a 64-unit hidden layer and the classifier. Inputs smaller than 20 pixels (scikit-learn's
8x8 digits) get 'same' padding so that the two poolings still fit.
"""

from __future__ import annotations

import torch
from torch import nn

from partitions import DatasetInfo


class Net(nn.Module):
    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        pad = 0 if image_size >= 20 else 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=5, padding=pad),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=5, padding=pad),
            nn.GroupNorm(4, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.classifier = nn.Sequential(nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(info: DatasetInfo, seed: int | None = None) -> Net:
    """The model for a dataset; with ``seed``, its initial weights are reproducible."""
    channels, height, width = info.image_shape
    if height != width:
        raise ValueError(f"Square images expected, got {height}x{width}")
    if seed is None:
        return Net(channels, height, info.num_classes)
    devices: list = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return Net(channels, height, info.num_classes)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
