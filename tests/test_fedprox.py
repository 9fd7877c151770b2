"""FedProx: the proximal term's value and gradient, mu = 0 equals FedAvg, mu > 0 pulls back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fl_app.model import build_model
from fl_app.training import LocalHooks, train_local
from partitions import DataConfig, dataset_info, load_client_data
from strategies.fedprox import PROXIMAL_MU, FedProx, client_hooks, proximal_term
from tests.helpers import make_grid, make_reply


class Vector(nn.Module):
    def __init__(self, values):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(values, dtype=torch.float64))


def test_proximal_term_hand_computed():
    """(mu/2)||w - w_g||^2 with w = (1, 2), w_g = (0, -1), mu = 0.5: 0.25 * (1 + 9) = 2.5."""
    model = Vector([1.0, 2.0])
    term = proximal_term(model, {"w": torch.tensor([0.0, -1.0], dtype=torch.float64)}, mu=0.5)
    assert float(term) == pytest.approx(2.5)


def test_proximal_gradient_is_mu_times_distance():
    rng = np.random.default_rng(0)
    model = Vector(rng.normal(size=5).tolist())
    w_global = torch.tensor(rng.normal(size=5))
    proximal_term(model, {"w": w_global}, mu=0.3).backward()
    expected = 0.3 * (model.w.detach() - w_global)
    torch.testing.assert_close(model.w.grad, expected)


def test_client_hook_adds_exactly_the_autograd_gradient_of_the_term():
    rng = np.random.default_rng(1)
    model = Vector(rng.normal(size=6).tolist())
    hooks = client_hooks(model, mu=0.7)  # w^t = the current w
    w_global = model.w.detach().clone()
    with torch.no_grad():  # training moves w away from w^t
        model.w.add_(torch.tensor(rng.normal(size=6)))
    model.w.grad = torch.tensor(rng.normal(size=6))
    data_grad = model.w.grad.clone()
    hooks.after_backward(model)
    reference = Vector(model.w.detach().tolist())
    proximal_term(reference, {"w": w_global}, mu=0.7).backward()
    torch.testing.assert_close(model.w.grad, data_grad + reference.w.grad)


def test_global_weights_are_a_detached_copy():
    """Training moves w; the hook must see w^t as it was, not follow w (the Flower-docs bug)."""
    model = Vector([1.0, 1.0])
    hooks = client_hooks(model, mu=2.0)
    with torch.no_grad():
        model.w.add_(torch.tensor([3.0, 4.0], dtype=torch.float64))
    model.w.grad = torch.zeros(2, dtype=torch.float64)
    hooks.after_backward(model)
    torch.testing.assert_close(model.w.grad, torch.tensor([6.0, 8.0], dtype=torch.float64))


def _digits():
    return load_client_data(DataConfig("digits", "dirichlet", 0.5, 2, 2, 0.2, 0), 1, 3)


def _train(hooks_for, epochs=2):
    model = build_model(dataset_info("digits"), seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train_local(model, _digits().train, epochs=epochs, batch_size=16, lr=0.05, momentum=0.9,
                seed=3, hooks=hooks_for(model))
    return model, start


def test_mu_zero_client_training_equals_plain_training():
    fedprox, _ = _train(lambda m: client_hooks(m, mu=0.0))
    plain, _ = _train(lambda m: LocalHooks())
    for key, value in plain.state_dict().items():
        assert torch.equal(value, fedprox.state_dict()[key]), key


def test_positive_mu_keeps_the_client_closer_to_the_global_model():
    def drift(mu):
        model, start = _train(lambda m: client_hooks(m, mu=mu), epochs=3)
        return sum(float((model.state_dict()[k] - start[k]).pow(2).sum()) for k in start)
    assert drift(1.0) < 0.8 * drift(0.0)


def test_server_sends_mu_and_aggregates_exactly_like_fedavg():
    """Weighted mean of (0, 3) x1 and (3, 0) x2 = (2, 1) for both strategies."""
    from flwr.app import Array, ArrayRecord

    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    prox = FedProx(proximal_mu=0.25, min_train_nodes=1, min_available_nodes=1)
    messages = list(prox.configure_train(1, arrays, ConfigRecord(), make_grid([1, 2])))
    assert messages[0].content["config"][PROXIMAL_MU] == 0.25
    replies = [make_reply({"w": np.array([0, 3], np.float32)}, num_examples=1, node_id=1),
               make_reply({"w": np.array([3, 0], np.float32)}, num_examples=2, node_id=2)]
    got, _ = prox.aggregate_train(1, replies)
    ref, _ = FedAvg(min_train_nodes=1, min_available_nodes=1).aggregate_train(1, replies)
    np.testing.assert_array_equal(got["w"].numpy(), ref["w"].numpy())
    np.testing.assert_allclose(got["w"].numpy(), [2.0, 1.0])


def test_negative_mu_is_refused():
    with pytest.raises(ValueError, match="proximal_mu must be >= 0"):
        FedProx(proximal_mu=-0.1)
    with pytest.raises(ValueError, match="proximal-mu must be >= 0"):
        client_hooks(Vector([0.0]), mu=-1.0)
