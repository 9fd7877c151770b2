"""experiments/dead_units.py counts the ReLU units no input activates."""

from __future__ import annotations

import torch
from torch import nn

from experiments.dead_units import dead_units


def test_a_layer_whose_units_never_fire_is_counted_and_the_model_predicts_one_class():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 5))
    x = torch.rand(50, 4)  # inputs in [0, 1)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1, 1, 1], [-1, -1, -1, -1], [1, 0, 0, 0]]))
        model[0].bias.copy_(torch.tensor([0.0, -0.1, -2.0]))  # units 1 and 2: never positive
    result = dead_units(model, x)
    assert (result["1"]["units"], result["1"]["dead"]) == (3, 2)
    assert abs(result["1"]["active_share"] - 1 / 3) < 1e-6
    assert result["predicted_classes"] >= 1
    with torch.no_grad():
        model[0].bias[0] = -5.0  # now every unit is dead: constant logits
    result = dead_units(model, x)
    assert result["1"]["dead"] == 3 and result["predicted_classes"] == 1
