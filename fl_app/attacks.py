"""Simulated Byzantine clients: a TEST FACILITY for measuring robust aggregation.

Off by default (``attack = "none"``) and refused outside simulation. Which partitions
attack follows from ``seed`` alone (``attacker_partitions``) and stays fixed for the run;
the client and, in simulation only, the server compute the same set.

Data and update attacks run in the client app, after local training and before the
reply is built (label flipping: before training, on the attacker's own data only):

- ``sign-flip``: the update is negated and scaled, y' = x - s * (y - x) (s =
  ``attack-scale``);
- ``gaussian``: the update is replaced by Gaussian noise, y' = x + N(0, sigma^2 I)
  (sigma = ``attack-std``);
- ``label-flip``: every training label l becomes C - 1 - l.

The omniscient attacks (``alie``, ``ipm``) need the benign updates of the round; they
are applied on the server by ``strategies.attack_sim.OmniscientAttack`` (the threat
model of those papers), see there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fl_common.arrays import ArrayDict
from partitions import ImageArrays

if TYPE_CHECKING:  # pragma: no cover
    from .config import RunConfig

ATTACKS = ("none", "sign-flip", "gaussian", "label-flip", "alie", "ipm")
CLIENT_ATTACKS = ("sign-flip", "gaussian", "label-flip")
OMNISCIENT_ATTACKS = ("alie", "ipm")
ATTACKER_TAG = 0xBAD  # separates the attacker draw from every other use of `seed`



def attacker_partitions(seed: int, num_partitions: int, num_attackers: int) -> frozenset[int]:
    """The partitions that attack in this run: ``num_attackers`` drawn from ``seed``."""
    if not 0 <= num_attackers <= num_partitions:
        raise ValueError(f"Run config 'num-attackers' = {num_attackers} must be in [0, "
                         f"{num_partitions}] (the number of partitions)")
    rng = np.random.default_rng([int(seed), ATTACKER_TAG])
    return frozenset(int(p) for p in rng.choice(num_partitions, num_attackers, replace=False))


def sign_flip(x: ArrayDict, y: ArrayDict, scale: float) -> ArrayDict:
    """y' = x - scale * (y - x): the update negated and scaled."""
    return {k: (x[k] - scale * (y[k].astype(np.float64) - x[k])).astype(y[k].dtype) for k in y}


def gaussian(x: ArrayDict, y: ArrayDict, std: float, rng: np.random.Generator) -> ArrayDict:
    """y' = x + N(0, std^2 I): the update replaced by noise."""
    return {k: (x[k] + rng.normal(0.0, std, size=y[k].shape)).astype(y[k].dtype) for k in y}


def flip_labels(data: ImageArrays, num_classes: int) -> ImageArrays:
    """Every label l becomes num_classes - 1 - l (the images are untouched)."""
    return ImageArrays(data.x, (num_classes - 1 - data.y).astype(data.y.dtype))


@dataclass(frozen=True)
class ClientAttack:
    """What an attacking client does to its data and to its reply."""

    kind: str
    scale: float
    std: float
    seed: int

    def data(self, train: ImageArrays, num_classes: int) -> ImageArrays:
        return flip_labels(train, num_classes) if self.kind == "label-flip" else train

    def update(self, x: ArrayDict, y: ArrayDict) -> ArrayDict:
        if self.kind == "sign-flip":
            return sign_flip(x, y, self.scale)
        if self.kind == "gaussian":
            return gaussian(x, y, self.std, np.random.default_rng(self.seed))
        return y


def client_attack(cfg: "RunConfig", partition_id: int, num_partitions: int,
                  server_round: int) -> ClientAttack | None:
    """This client's attack this round, or None (honest client, or no client-side attack)."""
    if cfg.attack not in CLIENT_ATTACKS:
        return None
    if partition_id not in attacker_partitions(cfg.seed, num_partitions, cfg.num_attackers):
        return None
    seed = int(np.random.SeedSequence([cfg.seed, server_round, partition_id, ATTACKER_TAG])
               .generate_state(1)[0])
    return ClientAttack(cfg.attack, float(cfg.attack_scale), float(cfg.attack_std), seed)
