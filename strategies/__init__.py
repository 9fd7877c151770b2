"""Strategy registry: run-config name -> a configured Message-API Strategy + client half.

The ServerApp wraps every strategy the registry builds in ``guard.Guarded`` (reply
validation, deterministic partition-aware sampling, round statistics), so the strategy
classes stay exactly the algorithm.

Our own implementations, one module each, server and client half together:
``fedprox`` (Li et al. 2020), ``scaffold`` (Karimireddy et al. 2020, Option II),
``fedadam`` (Reddi et al. 2021), ``krum`` and ``multikrum`` (Blanchard et al. 2017).

Flower's built-ins are here as comparison baselines:
``fedavg`` (McMahan et al. 2017), ``fedavgm`` (Hsu et al. 2019), ``fedyogi`` and
``fedadagrad`` (Reddi et al. 2021), ``fedmedian`` (Yin et al. 2018), ``fedtrimmedavg``
(Yin et al. 2018), ``bulyan`` (El Mhamdi et al. 2018).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)
from torch import nn

from fl_app import wire
from fl_app.training import LocalHooks

from .fedadam import FedAdam
from .bulyan import RecordingBulyan
from .fedprox import PROXIMAL_MU, FedProx, client_hooks
from .krum import Krum, MultiKrum
from .scaffold import VARIATES as SCAFFOLD_VARIATES
from .scaffold import WEIGHTINGS as SCAFFOLD_WEIGHTINGS
from .scaffold import Scaffold, ScaffoldClient
from .secagg import LINEAR, SECAGG_STRATEGIES  # noqa: F401  (sum-based strategies)

if TYPE_CHECKING:  # pragma: no cover
    from fl_app.config import RunConfig

# server-lr when the run config says "auto"
_DEFAULT_SERVER_LR = {"fedavgm": 1.0, "scaffold": 1.0, "fedadam": 0.01, "fedyogi": 0.01,
                      "fedadagrad": 0.01}


# Byzantine-robust rules and the fewest replies each needs for f malicious ones:
# Krum / Multi-Krum n >= 2f + 3 (Blanchard et al. 2017), Bulyan n >= 4f + 3
# (El Mhamdi et al. 2018).
ROBUST_MIN_REPLIES: dict[str, Callable[[int], int]] = {
    "krum": lambda f: 2 * f + 3,
    "multikrum": lambda f: 2 * f + 3,
    "bulyan": lambda f: 4 * f + 3,
}


def _common(cfg: "RunConfig") -> dict[str, Any]:
    return {
        "fraction_train": float(cfg.fraction_train),
        # no federated evaluation under DP: its metrics would leave the clients un-noised
        "fraction_evaluate": 0.0 if cfg.dp else float(cfg.fraction_evaluate),
        "min_train_nodes": cfg.min_train_nodes,
        "min_evaluate_nodes": 1,
        "min_available_nodes": cfg.min_train_nodes,
    }


def _fedavg(cfg: "RunConfig", num_clients: int, total_examples: int | None) -> Strategy:
    return FedAvg(**_common(cfg))


def _fedprox(cfg: "RunConfig", num_clients: int, total_examples: int | None) -> Strategy:
    return FedProx(**_common(cfg), proximal_mu=float(cfg.proximal_mu))


def _scaffold(cfg: "RunConfig", num_clients: int, total_examples: int | None) -> Strategy:
    return Scaffold(**_common(cfg), num_clients=num_clients, server_lr=cfg.effective_server_lr,
                    control_variate=cfg.scaffold_control_variate,
                    weighting=cfg.scaffold_weighting, total_examples=total_examples)


def _fedadam(cfg: "RunConfig", num_clients: int, total_examples: int | None) -> Strategy:
    return FedAdam(
        **_common(cfg),
        eta=cfg.effective_server_lr,
        beta_1=float(cfg.beta_1),
        beta_2=float(cfg.beta_2),
        tau=float(cfg.tau),
    )


def _fedavgm(cfg: "RunConfig", num_clients: int, total_examples: int | None) -> Strategy:
    return FedAvgM(
        **_common(cfg),
        server_learning_rate=cfg.effective_server_lr,
        server_momentum=float(cfg.server_momentum),
    )


def _fedyogi(cfg: "RunConfig", num_clients: int, total_examples: int | None) -> Strategy:
    return FedYogi(
        **_common(cfg),
        eta=cfg.effective_server_lr,
        eta_l=float(cfg.lr),
        beta_1=float(cfg.beta_1),
        beta_2=float(cfg.beta_2),
        tau=float(cfg.tau),
    )


def _fedadagrad(cfg: "RunConfig", num_clients: int, total_examples: int | None) -> Strategy:
    return FedAdagrad(
        **_common(cfg), eta=cfg.effective_server_lr, eta_l=float(cfg.lr), tau=float(cfg.tau)
    )


def _fedmedian(cfg: "RunConfig", num_clients: int, total_examples: int | None) -> Strategy:
    return FedMedian(**_common(cfg))


def _fedtrimmedavg(cfg: "RunConfig", num_clients: int, total_examples: int | None) -> Strategy:
    return FedTrimmedAvg(**_common(cfg), beta=float(cfg.trim_fraction))


def _num_selected(cfg: "RunConfig") -> int | None:
    return None if cfg.num_selected == "auto" else int(cfg.num_selected)


def _krum(cfg: "RunConfig", num_clients: int, total_examples: int | None) -> Strategy:
    return Krum(**_common(cfg), num_malicious=cfg.num_malicious)


def _multikrum(cfg: "RunConfig", num_clients: int, total_examples: int | None) -> Strategy:
    return MultiKrum(**_common(cfg), num_malicious=cfg.num_malicious,
                     num_selected=_num_selected(cfg))


def _bulyan(cfg: "RunConfig", num_clients: int, total_examples: int | None) -> Strategy:
    return RecordingBulyan(**_common(cfg), num_malicious_nodes=cfg.num_malicious)


_BUILDERS: dict[str, Callable[..., Strategy]] = {
    "fedavg": _fedavg,
    "fedprox": _fedprox,
    "scaffold": _scaffold,
    "fedadam": _fedadam,
    "fedavgm": _fedavgm,
    "fedyogi": _fedyogi,
    "fedadagrad": _fedadagrad,
    "fedmedian": _fedmedian,
    "fedtrimmedavg": _fedtrimmedavg,
    "krum": _krum,
    "multikrum": _multikrum,
    "bulyan": _bulyan,
}
NAMES: tuple[str, ...] = tuple(_BUILDERS)


def default_server_lr(name: str) -> float:
    """The server learning rate used when ``server-lr = "auto"``."""
    return _DEFAULT_SERVER_LR.get(name, 1.0)


def build(cfg: "RunConfig", num_clients: int, total_examples: int | None = None) -> Strategy:
    """The bare strategy named by ``cfg.strategy`` (not yet wrapped by ``Guarded``).

    ``num_clients`` is the number of partitions (N in SCAFFOLD's c update);
    ``total_examples`` the training examples of all of them (n in SCAFFOLD's
    num-examples weighting).
    """
    try:
        builder = _BUILDERS[cfg.strategy]
    except KeyError:
        raise ValueError(
            f"Run config 'strategy' must be one of {list(NAMES)}; got {cfg.strategy!r}"
        ) from None
    return builder(cfg, num_clients, total_examples)


def sampled_per_round(cfg: "RunConfig", num_nodes: int) -> int:
    """How many nodes FedAvg's ``configure_train`` samples: max(int(N * fraction), min)."""
    return max(int(num_nodes * float(cfg.fraction_train)), cfg.min_train_nodes)


def check_feasible(cfg: "RunConfig", num_nodes: int) -> None:
    """Raise before training if the strategy can never aggregate with ``num_nodes`` nodes."""
    if cfg.strategy not in ROBUST_MIN_REPLIES:
        return
    f = cfg.num_malicious
    need = ROBUST_MIN_REPLIES[cfg.strategy](f)
    sampled = min(sampled_per_round(cfg, num_nodes), num_nodes)
    if sampled < need:
        raise ValueError(
            f"Strategy {cfg.strategy!r} with 'num-malicious' = {f} needs at least {need} "
            f"replies per round, but only {sampled} of the {num_nodes} nodes are sampled "
            f"('fraction-train' = {cfg.fraction_train}, 'min-train-nodes' = "
            f"{cfg.min_train_nodes}); raise 'fraction-train' or lower 'num-malicious'"
        )
    if cfg.strategy == "multikrum" and cfg.num_selected != "auto" and cfg.num_selected > sampled - f:
        raise ValueError(
            f"Run config 'num-selected' = {cfg.num_selected} exceeds n - f = {sampled} - {f} = "
            f"{sampled - f} (n: the {sampled} nodes sampled per round); accepted: 1 to "
            f"{sampled - f}, or \"auto\""
        )


@dataclass
class ClientHalf:
    """What a strategy asks of the client's local training.

    ``hooks`` go into ``train_local``; ``finish(model, steps)`` returns extra arrays for
    the reply (SCAFFOLD's Delta c_i) and updates the node's state; ``metrics()`` extra
    reply metrics.
    """

    hooks: LocalHooks = field(default_factory=LocalHooks)
    finish: Callable[[nn.Module, int], dict[str, np.ndarray]] = lambda model, steps: {}
    metrics: Callable[[], dict[str, int | float]] = dict


def client_half(name: str, model: nn.Module, content: RecordDict, state: RecordDict,
                *, lr: float, member_id: int, state_dir: str | None = None) -> ClientHalf:
    """The client half of strategy ``name``, set up from the train message ``content``.

    ``model`` must already hold the global weights (FedProx and SCAFFOLD copy them);
    ``member_id`` is this client's id in the federation, its partition id (SCAFFOLD's
    commit protocol is keyed on it); ``state_dir``: where state that must survive a
    restart is kept on disk (SCAFFOLD's c_i), if anywhere.
    """
    config = content[wire.CONFIG]
    if name == "fedprox":
        if PROXIMAL_MU not in config:
            raise ValueError(f"FedProx client: the train config carries no '{PROXIMAL_MU}'")
        return ClientHalf(hooks=client_hooks(model, float(config[PROXIMAL_MU])))
    if name == "scaffold":
        scaffold = ScaffoldClient(model, content, state, str(config[wire.RUN_TAG]), lr,
                                  member_id=member_id, server_round=int(config[wire.SERVER_ROUND]),
                                  state_dir=state_dir)
        return ClientHalf(hooks=scaffold.hooks, finish=scaffold.finish, metrics=scaffold.metrics)
    return ClientHalf()
