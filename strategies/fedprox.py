"""FedProx: Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in
Heterogeneous Networks", MLSys 2020. https://arxiv.org/abs/1812.06127

Client k approximately minimizes, from the global weights w^t,

    h_k(w; w^t) = F_k(w) + (mu / 2) * ||w - w^t||^2          (paper, eq. 2)

so each local gradient gains mu * (w - w^t), pulling the local model toward the global
one. The server aggregates exactly as FedAvg (weighted by num-examples); with mu = 0,
FedProx is FedAvg.

Parameters and symbols: ``proximal_mu`` = mu (run-config ``proximal-mu``, >= 0).

The client adds the term's gradient, mu * (w - w^t), to each local gradient directly
(``add_proximal_gradient``) instead of differentiating the term through autograd: the
update is the same, and a step costs one in-place add per tensor. The tests check it
against autograd on ``proximal_term``, the paper's objective.

Two known slips this module avoids (both in Flower's docs snippet): the term is the
*squared* norm with the 1/2 factor (its gradient is mu * (w - w^t), not a unit vector),
and w^t is a *detached copy* taken before training (a live reference makes it zero).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fl_common import wire
from fl_common.hooks import LocalHooks

from .spec import ClientHalf, ClientInputs, StrategySpec, Traits, fedavg_kwargs

PROXIMAL_MU = "proximal-mu"


def proximal_term(model: nn.Module, global_params: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """(mu / 2) * sum_j ||w_j - w^t_j||^2 over the model's trainable parameters."""
    total = torch.zeros(())
    for name, param in model.named_parameters():
        if param.requires_grad:
            total = total + (param - global_params[name]).pow(2).sum()
    return 0.5 * mu * total


@torch.no_grad()
def add_proximal_gradient(model: nn.Module, global_params: dict[str, torch.Tensor], mu: float) -> None:
    """grad += mu * (w - w^t): the gradient of ``proximal_term``, added in place."""
    for name, param in model.named_parameters():
        if param.grad is not None:
            param.grad.add_(param - global_params[name], alpha=mu)


def client_hooks(model: nn.Module, mu: float) -> LocalHooks:
    """Hooks for ``train_local``: the proximal gradient against a frozen copy of w^t."""
    if mu < 0:
        raise ValueError(f"proximal-mu must be >= 0, got {mu}")
    global_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return LocalHooks(after_backward=lambda m: add_proximal_gradient(m, global_params, mu))


class FedProx(FedAvg):
    """FedAvg that sends ``proximal-mu`` to the clients (server side of FedProx)."""

    def __init__(self, *, proximal_mu: float, **fedavg_kwargs) -> None:
        if not proximal_mu >= 0:
            raise ValueError(f"FedProx proximal_mu must be >= 0, got {proximal_mu}")
        super().__init__(**fedavg_kwargs)
        self.proximal_mu = float(proximal_mu)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[PROXIMAL_MU] = self.proximal_mu
        return super().configure_train(server_round, arrays, config, grid)

    def summary(self) -> None:
        from logging import INFO

        from flwr.supercore import log

        log(INFO, "\t├──> FedProx: proximal-mu (mu) = %g", self.proximal_mu)
        super().summary()


def _client_half(inputs: ClientInputs) -> ClientHalf:
    config = inputs.content[wire.CONFIG]
    if PROXIMAL_MU not in config:
        raise ValueError(f"FedProx client: the train config carries no '{PROXIMAL_MU}'")
    return ClientHalf(hooks=client_hooks(inputs.model, float(config[PROXIMAL_MU])))


SPEC = StrategySpec(
    name="fedprox",
    reference="Li et al., Federated Optimization in Heterogeneous Networks, MLSys 2020",
    build=lambda b: FedProx(**fedavg_kwargs(b.cfg), proximal_mu=float(b.cfg.proximal_mu)),
    traits=Traits(linear=True, secagg=True, user_dp=True),
    client_half=_client_half,
)
