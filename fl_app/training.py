"""Local training and evaluation: plain PyTorch, one function each.

The algorithm's client half plugs into ``train_local`` through two optional hooks, so
the loop itself is the same for every strategy:

- ``penalty(model) -> Tensor``: a term added to the loss (not allowed under DP: it
  would be clipped and noised with the data);
- ``after_backward(model)``: runs after ``loss.backward()``, before the optimizer step
  (FedProx's proximal gradient, SCAFFOLD's correction). Under DP it runs after Opacus
  has clipped, noised and scaled the gradient: post-processing of the private gradient.

With ``dp`` settings the same loop runs Opacus's DP-SGD (``fl_app/privacy.py``): batches
are Poisson-sampled instead of a shuffled partition of the data, and the step is
clip, noise, scale, hook, SGD.

Both functions run where the model is (``resolve_device`` picks it from run-config
``device``): each batch is moved to the model's device; the data stay in host memory
and the shuffling and Poisson sampling stay on the CPU, so the batches drawn for a seed
are the same on every device (the arithmetic on a GPU is not bit-identical to the CPU's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from fl_common.hooks import LocalHooks
from partitions import ImageArrays

if TYPE_CHECKING:  # pragma: no cover
    from .privacy import DPSGD


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(setting: str, cuda_available: bool | None = None) -> torch.device:
    """The torch device for run-config ``device`` in this process.

    ``auto``: the GPU where this process has one (as Flower's examples pick it), else
    the CPU; ``cpu``; ``cuda``: a GPU, and an error naming the key where there is none
    (a run that asked for GPUs should not crawl on a CPU unnoticed).
    """
    if setting not in DEVICES:
        raise ValueError(f"Run config 'device' must be one of {list(DEVICES)}; got {setting!r}")
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if setting == "cuda" and not cuda_available:
        raise ValueError("Run config 'device' = \"cuda\" but this process sees no CUDA GPU "
                         "(torch.cuda.is_available() is False); use \"auto\" or \"cpu\"")
    return torch.device("cuda" if setting != "cpu" and cuda_available else "cpu")


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@dataclass(frozen=True)
class TrainResult:
    num_examples: int  # samples in the local training set
    loss: float  # mean training loss over the last epoch (without the penalty)
    accuracy: float  # training accuracy over the last epoch
    steps: int  # optimizer steps taken (K in SCAFFOLD)


def _shuffled_batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    return (order[start:start + batch_size] for start in range(0, n, batch_size))


class PlainSGD:
    """The plain update: mini-batch SGD over a shuffled partition of the data. Has the
    interface of ``privacy.PrivateTraining`` (DP-SGD), so the loop is the same for both:
    ``module`` (what the forward pass runs), ``batches()`` (one epoch of index batches),
    ``zero_grad()``, ``step(after_backward)`` and ``close()``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, num_examples: int,
                 batch_size: int, generator: torch.Generator) -> None:
        self.module, self.optimizer = model, optimizer
        self.num_examples, self.batch_size, self.generator = num_examples, batch_size, generator

    def batches(self):
        return _shuffled_batches(self.num_examples, self.batch_size, self.generator)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, after_backward=None) -> None:
        if after_backward is not None:
            after_backward(self.module)
        self.optimizer.step()

    def close(self) -> None:
        pass


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
    dp: "DPSGD | None" = None,
) -> TrainResult:
    """``epochs`` passes of mini-batch SGD over ``data``, shuffled by ``seed``; with ``dp``
    (``privacy.DPSGD``: the settings and the node's accountant), Opacus's DP-SGD with
    Poisson-sampled batches instead. Runs on the model's device."""
    device = model_device(model)
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    n = len(y)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    criterion = nn.CrossEntropyLoss()
    if dp is not None:
        if hooks.penalty is not None:
            raise ValueError("A loss penalty would be clipped and noised with the data under "
                             "DP; apply it as an after_backward gradient term instead")
        update = dp.start(model, optimizer, num_examples=n, batch_size=batch_size)
    else:
        update = PlainSGD(model, optimizer, n, batch_size, torch.Generator().manual_seed(int(seed)))
    model.train()
    steps = 0
    loss_sum, correct, seen = 0.0, 0, 0
    try:
        for _ in range(epochs):
            loss_sum, correct, seen = 0.0, 0, 0
            for idx in update.batches():
                idx = torch.as_tensor(idx, dtype=torch.long)
                update.zero_grad()
                if not len(idx):  # an empty Poisson batch: its step is the noise alone
                    update.empty_step(hooks.after_backward)
                    steps += 1
                    continue
                inputs, targets = x[idx].to(device), y[idx].to(device)
                logits = update.module(inputs)
                loss = criterion(logits, targets)
                total = loss + hooks.penalty(model) if hooks.penalty is not None else loss
                total.backward()
                update.step(hooks.after_backward)
                steps += 1
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.detach().argmax(1) == targets).sum())
                seen += len(idx)
    finally:
        update.close()
    seen = max(seen, 1)
    return TrainResult(n, loss_sum / seen, correct / seen, steps)


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageArrays, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on ``data``."""
    model.eval()
    device = model_device(model)
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        inputs = x[start:start + batch_size].to(device)
        targets = y[start:start + batch_size].to(device)
        logits = model(inputs)
        loss_sum += float(criterion(logits, targets))
        correct += int((logits.argmax(1) == targets).sum())
    return loss_sum / len(y), correct / len(y)
