"""Local training and evaluation: plain PyTorch, one function each.

The algorithm's client half plugs into ``train_local`` through two optional hooks, so
the loop itself is the same for every strategy:

- ``penalty(model) -> Tensor``: a term added to the loss (FedProx's proximal term);
- ``after_backward(model)``: runs after ``loss.backward()``, before the optimizer step
  (SCAFFOLD's gradient correction).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from partitions import ImageArrays


@dataclass(frozen=True)
class TrainResult:
    num_examples: int  # samples in the local training set
    loss: float  # mean training loss over the last epoch (without the penalty)
    accuracy: float  # training accuracy over the last epoch
    steps: int  # optimizer steps taken (K in SCAFFOLD)


@dataclass(frozen=True)
class LocalHooks:
    penalty: Callable[[nn.Module], torch.Tensor] | None = None
    after_backward: Callable[[nn.Module], None] | None = None


def train_local(
    model: nn.Module,
    data: ImageArrays,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    seed: int = 0,
    hooks: LocalHooks = LocalHooks(),
) -> TrainResult:
    """``epochs`` passes of mini-batch SGD over ``data``, shuffled by ``seed``."""
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    n = len(y)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(int(seed))
    model.train()
    steps = 0
    loss_sum, correct = 0.0, 0
    for _ in range(epochs):
        loss_sum, correct = 0.0, 0
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            inputs, targets = x[idx], y[idx]
            optimizer.zero_grad(set_to_none=True)
            logits = model(inputs)
            loss = criterion(logits, targets)
            total = loss + hooks.penalty(model) if hooks.penalty is not None else loss
            total.backward()
            if hooks.after_backward is not None:
                hooks.after_backward(model)
            optimizer.step()
            steps += 1
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.detach().argmax(1) == targets).sum())
    return TrainResult(n, loss_sum / n, correct / n, steps)


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageArrays, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on ``data``."""
    model.eval()
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        loss_sum += float(criterion(logits, y[start:start + batch_size]))
        correct += int((logits.argmax(1) == y[start:start + batch_size]).sum())
    return loss_sum / len(y), correct / len(y)


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from several integers (run seed, round, partition, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])
