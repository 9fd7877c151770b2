"""Simulated Byzantine attackers on the server side: a TEST FACILITY, simulation only.

``AttackSimulation`` wraps the strategy under test (inside ``Guarded``, so it sees only
well-formed replies). Every round it counts how many of the valid replies came from the
attacking partitions (``attackers-sampled``) and, for a selecting rule (Krum,
Multi-Krum, Bulyan: given ``selected``, their ``last_selected``), how many of the replies
it aggregated did (``attackers-selected``). The server learns who attacked only through
this channel, which exists because the simulation knows the attacker draw
(``fl_app.attacks.attacker_partitions``); a real server has no such knowledge.

The two omniscient attacks rewrite the attackers' replies before the inner strategy sees
them. They need every benign update of the round, which is the threat model of their
papers (the strongest adversary, colluding and seeing all honest updates), not something
a real server would do:

- ``alie``: Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses For
  Distributed Learning", NeurIPS 2019. Every attacker sends mu - z * sigma (mu, sigma:
  coordinate-wise mean and standard deviation of the benign updates). z follows the
  paper's Algorithm 1 with n the replies of the round and f the attackers among them:
  s = floor(n/2 + 1) - f supporters are needed, and z = Phi^-1((n - s) / n). (Some
  implementations, e.g. ``ALittleIsEnoughAttack`` in epfml/byzantine-robust-noniid-
  optimizer, use Phi^-1((n - f - s) / (n - f)); we follow the paper.)
- ``ipm``: Xie, Koyejo, Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by
  Inner Product Manipulation", UAI 2019. Every attacker sends -epsilon times the mean
  of the benign updates (epsilon = ``attack-epsilon``; small against median/Krum-type
  rules, large against the mean).

Only the model's arrays are rewritten (SCAFFOLD's Delta c_i, if present, is left as is).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO
from statistics import NormalDist

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fl_common.arrays import ArrayDict

from .validation import strategy_state

SAMPLED_METRIC = "attackers-sampled"
SELECTED_METRIC = "attackers-selected"


# ------------------------------------------------------------------ pure math
def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s z for n replies of which f attack: Phi^-1((n - s) / n),
    s = floor(n/2 + 1) - f (at least 1)."""
    if not 0 <= f <= n or n < 2:
        raise ValueError(f"ALIE needs n >= 2 and 0 <= f <= n, got n={n}, f={f}")
    s = max(n // 2 + 1 - f, 1)
    return NormalDist().inv_cdf((n - s) / n)


def alie_update(benign: list[ArrayDict], z: float) -> ArrayDict:
    """mu - z * sigma of the benign updates, coordinate-wise (population std)."""
    return {k: np.mean([u[k] for u in benign], axis=0) - z * np.std([u[k] for u in benign], axis=0)
            for k in benign[0]}


def ipm_update(benign: list[ArrayDict], epsilon: float) -> ArrayDict:
    """-epsilon times the mean benign update."""
    return {k: -epsilon * np.mean([u[k] for u in benign], axis=0) for k in benign[0]}


# ------------------------------------------------------------------ wrapper
class AttackSimulation(Strategy):
    """Counts attackers per round and applies the omniscient attacks (see module docstring).

    ``partition_of(node_id)`` gives a node's partition (the guard's sampler knows it).
    """

    def __init__(self, inner: Strategy, *, attack: str, attackers: frozenset[int],
                 partition_of: Callable[[int], int | None], epsilon: float = 0.1,
                 selected: Callable[[], list[int]] | None = None) -> None:
        self.inner = inner
        self.selected = selected  # the node ids a selecting rule kept (spec trait "selects")
        self.attack = attack
        self.attackers = frozenset(attackers)
        self.partition_of = partition_of
        self.epsilon = float(epsilon)
        self.x: ArrayDict | None = None

    def summary(self) -> None:
        log(INFO, "\t├──> SIMULATED ATTACK (test facility): %s by partitions %s",
            self.attack, sorted(self.attackers))
        self.inner.summary()

    def state_dict(self) -> dict:
        return strategy_state(self.inner)

    def is_attacker(self, message: Message) -> bool:
        return self.partition_of(message.metadata.src_node_id) in self.attackers

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.x = {k: a.numpy() for k, a in arrays.items()}
        return self.inner.configure_train(server_round, arrays, config, grid)

    def _rewrite(self, replies: list[Message]) -> None:
        bad = [m for m in replies if self.is_attacker(m)]
        good = [m for m in replies if not self.is_attacker(m)]
        if not bad or not good or self.x is None:
            return
        benign = []
        for message in good:
            record = next(iter(message.content.array_records.values()))
            benign.append({k: record[k].numpy().astype(np.float64) - self.x[k] for k in self.x})
        if self.attack == "alie":
            update = alie_update(benign, alie_z(len(replies), len(bad)))
        else:
            update = ipm_update(benign, self.epsilon)
        for message in bad:
            record = next(iter(message.content.array_records.values()))
            for key in self.x:
                record[key] = Array((self.x[key] + update[key]).astype(record[key].numpy().dtype))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self.attack in ("alie", "ipm"):
            self._rewrite(replies)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        merged = MetricRecord(dict(metrics) if metrics is not None else {})
        merged[SAMPLED_METRIC] = sum(self.is_attacker(m) for m in replies)
        selected = self.selected() if self.selected is not None else None
        if selected is not None:
            merged[SELECTED_METRIC] = sum(self.partition_of(n) in self.attackers for n in selected)
        return arrays, merged

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
