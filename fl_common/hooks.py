"""The protocol between local training and a strategy's client half.

``train_local`` (fl_app/training.py) runs the same loop for every strategy; a strategy's
client half (strategies/spec.py ``ClientHalf``) plugs into it through these hooks:

- ``penalty(model) -> Tensor``: a term added to the loss (not allowed under DP: it would
  be clipped and noised with the data);
- ``after_backward(model)``: runs after ``loss.backward()``, before the optimizer step
  (FedProx's proximal gradient, SCAFFOLD's correction). Under DP it runs after Opacus
  has clipped, noised and scaled the gradient: post-processing of the private gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LocalHooks:
    penalty: Callable[[nn.Module], torch.Tensor] | None = None
    after_backward: Callable[[nn.Module], None] | None = None
