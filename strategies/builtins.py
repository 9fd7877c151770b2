"""Flower's built-in strategies, as comparison baselines: their specs.

Each is Flower's own class from ``flwr/serverapp/strategy/`` (flwr 1.42), unchanged;
the spec only says how the run config builds it and what the app may combine it with.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdagrad, FedAvg, FedAvgM, FedMedian, FedTrimmedAvg, FedYogi

from .krum import ROBUST_REFUSALS
from .spec import StrategySpec, Traits, effective_server_lr, fedavg_kwargs

MEAN = Traits(linear=True, secagg=True, user_dp=True)
MOMENTUM = Traits(linear=True, secagg=True, user_dp=True, default_server_lr=1.0)
ADAPTIVE = Traits(linear=True, secagg=True, user_dp=True, default_server_lr=0.01)
ROBUST = Traits(refusals=ROBUST_REFUSALS)

FEDAVG = StrategySpec(
    name="fedavg",
    reference="McMahan et al., Communication-Efficient Learning of Deep Networks from "
              "Decentralized Data, AISTATS 2017 (flwr/serverapp/strategy/fedavg.py)",
    build=lambda b: FedAvg(**fedavg_kwargs(b.cfg)),
    traits=MEAN,
)
FEDAVGM = StrategySpec(
    name="fedavgm",
    reference="Hsu et al., Measuring the Effects of Non-Identical Data Distribution for "
              "Federated Visual Classification, 2019 (flwr/serverapp/strategy/fedavgm.py)",
    build=lambda b: FedAvgM(**fedavg_kwargs(b.cfg),
                            server_learning_rate=effective_server_lr(b.cfg, MOMENTUM),
                            server_momentum=float(b.cfg.server_momentum)),
    traits=MOMENTUM,
)
FEDYOGI = StrategySpec(
    name="fedyogi",
    reference="Reddi et al., Adaptive Federated Optimization, ICLR 2021 "
              "(flwr/serverapp/strategy/fedyogi.py)",
    build=lambda b: FedYogi(**fedavg_kwargs(b.cfg), eta=effective_server_lr(b.cfg, ADAPTIVE),
                            eta_l=float(b.cfg.lr), beta_1=float(b.cfg.beta_1),
                            beta_2=float(b.cfg.beta_2), tau=float(b.cfg.tau)),
    traits=ADAPTIVE,
)
FEDADAGRAD = StrategySpec(
    name="fedadagrad",
    reference="Reddi et al., ICLR 2021 (flwr/serverapp/strategy/fedadagrad.py)",
    build=lambda b: FedAdagrad(**fedavg_kwargs(b.cfg), eta=effective_server_lr(b.cfg, ADAPTIVE),
                               eta_l=float(b.cfg.lr), tau=float(b.cfg.tau)),
    traits=ADAPTIVE,
)
FEDMEDIAN = StrategySpec(
    name="fedmedian",
    reference="Yin et al., Byzantine-Robust Distributed Learning: Towards Optimal "
              "Statistical Rates, ICML 2018 (flwr/serverapp/strategy/fedmedian.py)",
    build=lambda b: FedMedian(**fedavg_kwargs(b.cfg)),
    traits=ROBUST,
)
FEDTRIMMEDAVG = StrategySpec(
    name="fedtrimmedavg",
    reference="Yin et al., ICML 2018 (flwr/serverapp/strategy/fedtrimmedavg.py)",
    build=lambda b: FedTrimmedAvg(**fedavg_kwargs(b.cfg), beta=float(b.cfg.trim_fraction)),
    traits=ROBUST,
)
