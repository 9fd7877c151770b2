"""FedAdam: Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive
Federated Optimization", ICLR 2021. https://arxiv.org/abs/2003.00295

Algorithm 2 (FedAdam). With x_t the global model and Delta_t the (num-examples weighted)
mean client update, the server takes one Adam step on the pseudo-gradient -Delta_t:

    Delta_t = mean_i(x_i) - x_t
    m_t     = beta_1 * m_{t-1} + (1 - beta_1) * Delta_t
    v_t     = beta_2 * v_{t-1} + (1 - beta_2) * Delta_t^2
    x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

with m_0 = v_0 = 0. Symbols: eta = ``server-lr``, beta_1 = ``beta-1``, beta_2 = ``beta-2``,
tau = ``tau`` (the adaptivity; the authors recommend 1e-3).

Deliberate difference from Flower's built-in ``FedAdam``: none of the paper's steps is
bias-corrected, and neither is this one. Flower multiplies eta by
sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1)) in round t (Kingma and Ba's correction, with
the exponent shifted by one). ``bias_correction_factor`` computes that factor; the tests
check that, fed the same x_t and replies, this step times the factor equals Flower's step
in every round, and that the moments m_t, v_t are identical.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fl_common.arrays import ArrayDict

from .spec import StrategySpec, Traits, effective_server_lr, fedavg_kwargs


def fedadam_step(
    x: ArrayDict,
    delta: ArrayDict,
    m: ArrayDict | None,
    v: ArrayDict | None,
    *,
    eta: float,
    beta_1: float,
    beta_2: float,
    tau: float,
) -> tuple[ArrayDict, ArrayDict, ArrayDict]:
    """One server Adam step (Reddi et al., Algorithm 2): returns (x_{t+1}, m_t, v_t)."""
    if m is None:
        m = {k: np.zeros_like(d) for k, d in delta.items()}
    if v is None:
        v = {k: np.zeros_like(d) for k, d in delta.items()}
    new_m = {k: beta_1 * m[k] + (1.0 - beta_1) * delta[k] for k in delta}
    new_v = {k: beta_2 * v[k] + (1.0 - beta_2) * np.square(delta[k]) for k in delta}
    new_x = {k: (x[k] + eta * new_m[k] / (np.sqrt(new_v[k]) + tau)).astype(x[k].dtype) for k in x}
    return new_x, new_m, new_v


def bias_correction_factor(server_round: int, beta_1: float, beta_2: float) -> float:
    """The factor Flower's FedAdam applies to eta in ``server_round`` (and we do not)."""
    return float(np.sqrt(1 - beta_2 ** (server_round + 1.0)) / (1 - beta_1 ** (server_round + 1.0)))


def validate_adam(eta: float, beta_1: float, beta_2: float, tau: float) -> None:
    if not eta > 0:
        raise ValueError(f"FedAdam server-lr (eta) must be > 0, got {eta}")
    for name, beta in (("beta-1", beta_1), ("beta-2", beta_2)):
        if not 0 <= beta < 1:
            raise ValueError(f"FedAdam {name} must be in [0, 1), got {beta}")
    if not tau > 0:
        raise ValueError(f"FedAdam tau must be > 0, got {tau}")


class FedAdam(FedAvg):
    """FedAvg's weighted mean followed by a server Adam step (see the module docstring)."""

    def __init__(self, *, eta: float = 0.01, beta_1: float = 0.9, beta_2: float = 0.99,
                 tau: float = 1e-3, **fedavg_kwargs) -> None:
        validate_adam(eta, beta_1, beta_2, tau)
        super().__init__(**fedavg_kwargs)
        self.eta, self.beta_1, self.beta_2, self.tau = float(eta), float(beta_1), float(beta_2), float(tau)
        self.x: ArrayDict | None = None
        self.m: ArrayDict | None = None
        self.v: ArrayDict | None = None

    def summary(self) -> None:
        log(INFO, "\t├──> FedAdam: eta %g, beta_1 %g, beta_2 %g, tau %g (no bias correction)",
            self.eta, self.beta_1, self.beta_2, self.tau)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.x = {k: a.numpy() for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None:
            return None, metrics
        if self.x is None:
            raise RuntimeError("FedAdam.aggregate_train called before configure_train")
        delta = {k: a.numpy() - self.x[k] for k, a in mean.items()}
        new_x, self.m, self.v = fedadam_step(
            self.x, delta, self.m, self.v,
            eta=self.eta, beta_1=self.beta_1, beta_2=self.beta_2, tau=self.tau,
        )
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in new_x.items()}), metrics

    def state_dict(self) -> dict[str, ArrayDict | None]:
        """Server state (Adam moments) to checkpoint beside the global model."""
        copy = lambda d: None if d is None else {k: v.copy() for k, v in d.items()}  # noqa: E731
        return {"m": copy(self.m), "v": copy(self.v)}

    def load_state_dict(self, state: dict[str, ArrayDict | None]) -> None:
        self.m = None if state["m"] is None else {k: np.array(v) for k, v in state["m"].items()}
        self.v = None if state["v"] is None else {k: np.array(v) for k, v in state["v"].items()}


TRAITS = Traits(linear=True, secagg=True, user_dp=True, default_server_lr=0.01)
SPEC = StrategySpec(
    name="fedadam",
    reference="Reddi et al., Adaptive Federated Optimization, ICLR 2021 (Algorithm 2)",
    build=lambda b: FedAdam(**fedavg_kwargs(b.cfg), eta=effective_server_lr(b.cfg, TRAITS),
                            beta_1=float(b.cfg.beta_1), beta_2=float(b.cfg.beta_2),
                            tau=float(b.cfg.tau)),
    traits=TRAITS,
)
