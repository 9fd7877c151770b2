"""User-level (central) DP on the server: Flower's DifferentialPrivacyClientSideFixedClipping.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018): every sampled client clips its
update Delta_i to ||Delta_i|| <= C (``fl_app/central_dp.py``), the server takes the
uniform mean of the m updates and adds N(0, (sigma C / m)^2) per coordinate (Flower's
``DifferentialPrivacyClientSideFixedClipping``; sigma = ``dp-noise-multiplier``, C =
``dp-max-grad-norm``, m = the clients sampled per round). One round is a Gaussian
mechanism of noise multiplier sigma on a sum of sensitivity C; the rounds compose, and
the spend is accounted here with Opacus's RDP accountant with no amplification by
sampling (q = 1: conservative, since which clients are sampled is not secret here).

What the guarantee needs, and what this wrapper enforces:
- the uniform mean: clients report ``num-examples`` = 1 in this mode (a client's data size
  is its private data too), so FedAvg's weights are equal;
- exactly m updates in every aggregate: a round with fewer valid replies is skipped (the
  guard's minimum is set to m), so the noise is never calibrated for more clients than
  were averaged;
- a mean, not a robust rule or a second statistic: strategies that post-process FedAvg's
  mean (FedAvg, FedProx, FedAdam, FedAvgM, FedYogi, FedAdagrad) keep the guarantee;
  SCAFFOLD (its Delta c_i is a second, unclipped statistic, and Flower's mod accepts one
  ArrayRecord), Krum, Bulyan, FedMedian and FedTrimmedAvg (the noise is calibrated for a
  mean) are refused before training (``fl_app/config.py``).

Flower's wrapper draws its noise from NumPy's global generator; it is seeded per round
from ``seed`` so that runs are reproducible (experiments only: a deployment would use a
secure generator).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy
from flwr.supercore import log
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from .validation import strategy_state

EPSILON_METRIC = "dp-user-epsilon"  # the run's user-level spend after this round
RELEASES_METRIC = "dp-user-releases"  # how many noised aggregates were kept so far
NOISE_TAG = 0xCD  # separates the server noise seed from other uses of `seed`


def user_noise(cfg) -> float:
    """sigma: ``dp-noise-multiplier``, or the one that makes num-server-rounds releases
    spend ``dp-target-epsilon`` (Opacus's search, q = 1)."""
    if cfg.dp_target_epsilon > 0:
        return float(get_noise_multiplier(target_epsilon=float(cfg.dp_target_epsilon),
                                          target_delta=float(cfg.dp_delta), sample_rate=1.0,
                                          steps=cfg.num_server_rounds, accountant="rdp"))
    return float(cfg.dp_noise_multiplier)


def check_user_run(cfg, num_clients: int) -> None:
    """Before training: delta below 1/N (N clients: one user is one client) and a
    reachable target. Raises ValueError saying what to change."""
    if not cfg.dp_delta < 1.0 / num_clients:
        raise ValueError(f"Run config 'dp-delta' = {cfg.dp_delta:g} must be below 1/N = "
                         f"{1.0 / num_clients:.3g} with dp-mode \"user\" (N = {num_clients} clients)")
    try:
        user_noise(cfg)
    except ValueError as err:
        raise ValueError(f"Run config 'dp-target-epsilon' = {cfg.dp_target_epsilon:g} cannot be "
                         f"reached in {cfg.num_server_rounds} rounds at delta {cfg.dp_delta:g} "
                         f"({err})") from None


def user_level_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon after ``releases`` Gaussian mechanisms of noise multiplier sigma (q = 1)."""
    if releases == 0:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), 1.0, int(releases))]
    return float(accountant.get_epsilon(delta))


class UserLevelDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper, with exact-m rounds, seeded noise
    and the user-level spend in the round metrics."""

    def __init__(self, strategy: Strategy, *, noise_multiplier: float, clipping_norm: float,
                 num_sampled_clients: int, delta: float, seed: int) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self.delta = float(delta)
        self.seed = int(seed)
        self.releases = 0

    def state_dict(self) -> dict:
        return {"releases": self.releases, "inner": strategy_state(self.strategy)}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if len(replies) != self.num_sampled_clients:
            log(WARNING, "User-level DP: %d valid replies, the noise is calibrated for %d; "
                         "the round is skipped", len(replies), self.num_sampled_clients)
            arrays, metrics = None, MetricRecord({})
        else:
            np.random.seed(np.random.SeedSequence([self.seed, server_round, NOISE_TAG])
                           .generate_state(1)[0])
            arrays, metrics = super().aggregate_train(server_round, replies)
            if arrays is not None:
                self.releases += 1
        metrics = MetricRecord(dict(metrics) if metrics is not None else {})
        metrics[RELEASES_METRIC] = self.releases
        metrics[EPSILON_METRIC] = user_level_epsilon(self.noise_multiplier, self.releases,
                                                     self.delta)
        return arrays, metrics
