"""The models, chosen by the run-config key ``model``.

- ``cnn`` (default): a small LeNet-style CNN with GroupNorm (Opacus cannot privatize
  BatchNorm). For 28x28 grayscale input it has 46,826 parameters: two 5x5 convolutions
  (16 and 32 channels, each followed by GroupNorm, ReLU and 2x2 max-pooling), a 64-unit
  hidden layer and the classifier. Inputs smaller than 20 pixels (scikit-learn's 8x8
  digits) get 'same' padding so that the two poolings still fit.
- ``mlp``: the "2NN" of McMahan et al., "Communication-Efficient Learning of Deep
  Networks from Decentralized Data", AISTATS 2017 (Section 3): two hidden layers of 200
  ReLU units (199,210 parameters for 28x28 input).
- ``logreg``: multinomial logistic regression, one linear layer on the flattened image
  (7,850 parameters for 28x28 input). Its cross-entropy loss is convex, the setting in
  which SCAFFOLD's analysis (Karimireddy et al., ICML 2020, Theorem III) is tight.
"""

from __future__ import annotations

import torch
from torch import nn

from partitions import DatasetInfo

MODELS = ("cnn", "mlp", "logreg")


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


class MLP(nn.Module):
    """McMahan et al.'s 2NN: flatten, 200 ReLU, 200 ReLU, classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 200) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: logits = W x + b on the flattened image."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(x, 1))


def _make(kind: str, info: DatasetInfo) -> nn.Module:
    channels, height, width = info.image_shape
    if kind == "cnn":
        if height != width:
            raise ValueError(f"The cnn model needs square images, got {height}x{width}")
        return Net(channels, height, info.num_classes)
    if kind == "mlp":
        return MLP(channels * height * width, info.num_classes)
    if kind == "logreg":
        return LogisticRegression(channels * height * width, info.num_classes)
    raise ValueError(f"Run config 'model' must be one of {list(MODELS)}; got {kind!r}")


INIT_SEED_TAG = 0x1A17  # separates the model-init seed from other uses of `seed`


def build_model(info: DatasetInfo, seed: int | None = None, kind: str = "cnn") -> nn.Module:
    """The ``kind`` model for a dataset; with ``seed``, its initial weights are reproducible."""
    if seed is None:
        return _make(kind, info)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _make(kind, info)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
