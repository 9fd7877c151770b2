"""User-level (central) DP on the server: DP-FedAvg's Gaussian mechanism on the clipped
mean, released *before* any server optimizer sees it.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018, Algorithm 1): every sampled client clips its update
Delta_i = y_i - x to ||Delta_i|| <= C (Flower's ``fixedclipping_mod``, behind
``fl_app/user_dp_client.py``'s gate); the server takes the uniform mean of the m updates
and adds N(0, (sigma C / m)^2) per coordinate (sigma = ``dp-noise-multiplier``, C =
``dp-max-grad-norm``, m = the clients sampled per round). One round is a Gaussian
mechanism of noise multiplier sigma on a sum of sensitivity C (one user's update added,
removed or replaced by one of norm <= C moves the sum by at most C ... 2C: see
docs/privacy.md for the neighbouring relation); the rounds compose, accounted with
Opacus's RDP accountant with no amplification by sampling (q = 1: conservative, since
which clients are sampled is not secret here).

Where the noise goes. Flower's ``DifferentialPrivacyClientSideFixedClipping``
(flwr/serverapp/strategy/dp_fixed_clipping.py) adds the noise to the *output* of the
wrapped strategy's ``aggregate_train``. For FedAvg that output is the mean, but FedAdam,
FedYogi, FedAdagrad and FedAvgM first update their moments from the un-noised mean, and
the noised output then carries those moments: measured with the defaults, one release's
sensitivity grew to 3.5x the mean's by round 5 and 7.1x by round 30 (bounded by
eta / tau = 10), so the effective noise multiplier fell to about sigma / 7. Here the
mechanism runs first: the replies are re-clipped (a client that did not clip changes
nothing), averaged uniformly, noised, and the wrapped strategy receives ONE reply, the
private release ``x + mean(Delta_i) + Z``. Whatever it does with it (FedAvg keeps it,
FedAdam's moments, FedAvgM's momentum) is post-processing of a private release, and the
release's sensitivity is the mean's whatever the strategy (tests/test_user_dp.py).

The noise is secret (``dp-randomness = "secure"``, the default): a NumPy generator keyed
by 128 bits from the OS CSPRNG, new for every release (``fl_common/randomness.py``).
With ``"seeded"`` it is drawn from (``seed``, round): reproducible, and predictable by
every client, since the seed travels in the run config (a client that subtracts its own
update then holds the exact sum of all the others); the server accepts it only in
simulation.

What else the guarantee needs, and where it is enforced:
- the uniform mean: clients report ``num-examples`` = 1 in this mode (a client's data
  size is its private data too), and the mean here ignores the reported weights;
- exactly m updates in every release: a round with fewer valid replies is skipped (the
  guard's minimum is set to m), so the noise is never calibrated for more clients than
  were averaged;
- a mean, not a robust rule or a second statistic: strategies that post-process the mean
  (FedAvg, FedProx, FedAdam, FedAvgM, FedYogi, FedAdagrad) keep the guarantee; SCAFFOLD
  (its Delta c_i is a second, unclipped statistic), Krum, Bulyan, FedMedian and
  FedTrimmedAvg are refused before training (``fl_app/config.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fl_common import wire
from fl_common.randomness import RANDOMNESS_MODES, derive_seed, secret_numpy_generator

from .validation import array_values, strategy_state

EPSILON_METRIC = "dp-user-epsilon"  # the run's user-level spend after this round
RELEASES_METRIC = "dp-user-releases"  # how many noised aggregates were kept so far
RECLIPPED_METRIC = "dp-user-reclipped"  # replies whose update the server had to clip
NOISE_TAG = 0xCD  # separates the seeded server noise from other uses of `seed`


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


@dataclass
class _Sent:
    """The global model of the round in flight (x): not state, so never checkpointed."""

    arrays: dict[str, np.ndarray]


def clip_update(update: dict[str, np.ndarray], clipping_norm: float) -> tuple[dict[str, np.ndarray], bool]:
    """``update`` scaled to L2 norm <= C over all its arrays (Flower's fixedclipping_mod
    rule: factor min(1, C / ||Delta||)); True if it had to be scaled."""
    norm = float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values())))
    if norm <= clipping_norm:
        return update, False
    factor = clipping_norm / norm
    return {k: v * factor for k, v in update.items()}, True


class UserLevelDP(Strategy):
    """DP-FedAvg's mechanism around any strategy that post-processes a mean.

    ``configure_train`` asks the clients to clip (Flower's ``KEY_CLIPPING_NORM``);
    ``aggregate_train`` needs exactly m replies, re-clips each update, adds Gaussian
    noise of std sigma C / m to their uniform mean and hands the wrapped strategy that
    one release. ``randomness``: "secure" (CSPRNG-keyed noise, the default) or "seeded"
    (from ``seed`` and the round: experiments only).
    """

    def __init__(self, strategy: Strategy, *, noise_multiplier: float, clipping_norm: float,
                 num_sampled_clients: int, delta: float, randomness: str = "secure",
                 seed: int = 0, max_epsilon: float = 0.0) -> None:
        super().__init__()
        if noise_multiplier < 0 or clipping_norm <= 0 or num_sampled_clients < 1:
            raise ValueError("User-level DP needs sigma >= 0, C > 0 and m >= 1; got "
                             f"{noise_multiplier}, {clipping_norm}, {num_sampled_clients}")
        if randomness not in RANDOMNESS_MODES:
            raise ValueError(f"randomness must be one of {list(RANDOMNESS_MODES)}; got {randomness!r}")
        self.strategy = strategy
        self.noise_multiplier = float(noise_multiplier)
        self.clipping_norm = float(clipping_norm)
        self.num_sampled_clients = int(num_sampled_clients)
        self.delta = float(delta)
        self.randomness = randomness
        self.seed = int(seed)
        self.max_epsilon = float(max_epsilon)  # > 0: no release past it (dp-target-epsilon)
        self.releases = 0
        self._sent = _Sent({})

    def state_dict(self) -> dict:
        return {"releases": self.releases, "inner": strategy_state(self.strategy)}

    def summary(self) -> None:
        log(INFO, "\t├──> User-level DP (DP-FedAvg): sigma %s, C %s, m %d, noise %s",
            self.noise_multiplier, self.clipping_norm, self.num_sampled_clients, self.randomness)
        self.strategy.summary()

    # ---- the noise
    def noise_std(self) -> float:
        """sigma C / m: the noise on the uniform mean of m updates of norm <= C."""
        return self.noise_multiplier * self.clipping_norm / self.num_sampled_clients

    def generator(self, server_round: int):
        """This release's noise source: secret, or (seeded) NumPy's legacy generator on
        (seed, round), the stream the app used before."""
        if self.randomness == "secure":
            return secret_numpy_generator()
        return np.random.RandomState(derive_seed(self.seed, server_round, NOISE_TAG))

    def release(self, server_round: int, updates: list[dict[str, np.ndarray]]
                ) -> tuple[dict[str, np.ndarray], int]:
        """The mechanism: re-clip, uniform mean, Gaussian noise. Returns the noised mean
        update and how many updates had to be re-clipped."""
        clipped, reclipped = [], 0
        for update in updates:
            c, was = clip_update(update, self.clipping_norm)
            clipped.append(c)
            reclipped += int(was)
        rng, std = self.generator(server_round), self.noise_std()
        noised = {}
        for key in clipped[0]:
            mean = sum(u[key].astype(np.float64) for u in clipped) / len(clipped)
            noised[key] = mean + rng.normal(0.0, std, size=mean.shape)
        return noised, reclipped

    # ---- the Strategy interface
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config[KEY_CLIPPING_NORM] = self.clipping_norm
        self._sent = _Sent({k: a.numpy() for k, a in arrays.items()})
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error()]
        metrics = MetricRecord({})
        arrays = None
        after = user_level_epsilon(self.noise_multiplier, self.releases + 1, self.delta)
        if len(replies) != self.num_sampled_clients:
            log(WARNING, "User-level DP: %d valid replies, the noise is calibrated for %d; "
                         "the round is skipped", len(replies), self.num_sampled_clients)
        elif self.max_epsilon > 0 and after > self.max_epsilon * (1 + 1e-9):
            log(WARNING, "User-level DP: release %d would spend epsilon %.3f > the run's cap "
                         "%g (dp-target-epsilon); the round is skipped", self.releases + 1,
                after, self.max_epsilon)
        else:
            x = self._sent.arrays
            updates = []
            for reply in replies:
                record = reply.content[wire.ARRAYS]
                updates.append({k: array_values(record[k]).astype(np.float64) - x[k].astype(np.float64)
                                for k in x})
            noised, reclipped = self.release(server_round, updates)
            release = ArrayRecord({k: Array(np.ascontiguousarray(
                (x[k].astype(np.float64) + noised[k]).astype(x[k].dtype))) for k in x})
            arrays, inner_metrics = self.strategy.aggregate_train(
                server_round, [_release_message(release)])
            if arrays is not None:
                self.releases += 1
                log(INFO, "User-level DP: release %d, noise std %.4g on the mean of %d updates",
                    self.releases, self.noise_std(), len(updates))
            metrics = MetricRecord(dict(inner_metrics) if inner_metrics is not None else {})
            metrics[RECLIPPED_METRIC] = reclipped
        metrics[RELEASES_METRIC] = self.releases
        metrics[EPSILON_METRIC] = user_level_epsilon(self.noise_multiplier, self.releases,
                                                     self.delta)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


def _release_message(release: ArrayRecord) -> Message:
    """The private release as the one reply the wrapped strategy aggregates (weight 1)."""
    content = RecordDict({wire.ARRAYS: release,
                          wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 1})})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)
