"""Strategy registry: run-config name -> a configured Message-API Strategy.

Every strategy the registry builds is wrapped by ``guard.Guarded`` (reply validation,
deterministic partition-aware sampling, round statistics), so the wrapped classes stay
exactly the algorithm.

Flower's built-ins are here as comparison baselines:
``fedavg`` (McMahan et al. 2017), ``fedavgm`` (Hsu et al. 2019), ``fedyogi`` and
``fedadagrad`` (Reddi et al. 2021), ``fedmedian`` (Yin et al. 2018), ``fedtrimmedavg``
(Yin et al. 2018).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)

if TYPE_CHECKING:  # pragma: no cover
    from fl_app.config import RunConfig

# server-lr when the run config says "auto"
_DEFAULT_SERVER_LR = {"fedavgm": 1.0, "fedyogi": 0.01, "fedadagrad": 0.01}

# Strategies whose aggregate is a num-examples-weighted mean of the replies (optionally
# followed by a server optimizer step): the only ones that stay correct when secure
# aggregation hides the individual replies and reveals only their weighted sum.
LINEAR = ("fedavg", "fedavgm", "fedyogi", "fedadagrad")


def _common(cfg: "RunConfig") -> dict[str, Any]:
    return {
        "fraction_train": float(cfg.fraction_train),
        "fraction_evaluate": float(cfg.fraction_evaluate),
        "min_train_nodes": cfg.min_train_nodes,
        "min_evaluate_nodes": 1,
        "min_available_nodes": cfg.min_train_nodes,
    }


def _fedavg(cfg: "RunConfig") -> Strategy:
    return FedAvg(**_common(cfg))


def _fedavgm(cfg: "RunConfig") -> Strategy:
    return FedAvgM(
        **_common(cfg),
        server_learning_rate=cfg.effective_server_lr,
        server_momentum=float(cfg.server_momentum),
    )


def _fedyogi(cfg: "RunConfig") -> Strategy:
    return FedYogi(
        **_common(cfg),
        eta=cfg.effective_server_lr,
        eta_l=float(cfg.lr),
        beta_1=float(cfg.beta_1),
        beta_2=float(cfg.beta_2),
        tau=float(cfg.tau),
    )


def _fedadagrad(cfg: "RunConfig") -> Strategy:
    return FedAdagrad(
        **_common(cfg), eta=cfg.effective_server_lr, eta_l=float(cfg.lr), tau=float(cfg.tau)
    )


def _fedmedian(cfg: "RunConfig") -> Strategy:
    return FedMedian(**_common(cfg))


def _fedtrimmedavg(cfg: "RunConfig") -> Strategy:
    return FedTrimmedAvg(**_common(cfg), beta=float(cfg.trim_fraction))


_BUILDERS: dict[str, Callable[["RunConfig"], Strategy]] = {
    "fedavg": _fedavg,
    "fedavgm": _fedavgm,
    "fedyogi": _fedyogi,
    "fedadagrad": _fedadagrad,
    "fedmedian": _fedmedian,
    "fedtrimmedavg": _fedtrimmedavg,
}
NAMES: tuple[str, ...] = tuple(_BUILDERS)


def default_server_lr(name: str) -> float:
    """The server learning rate used when ``server-lr = "auto"``."""
    return _DEFAULT_SERVER_LR.get(name, 1.0)


def build(cfg: "RunConfig") -> Strategy:
    """The bare strategy named by ``cfg.strategy`` (not yet wrapped by ``Guarded``)."""
    try:
        builder = _BUILDERS[cfg.strategy]
    except KeyError:
        raise ValueError(
            f"Run config 'strategy' must be one of {list(NAMES)}; got {cfg.strategy!r}"
        ) from None
    return builder(cfg)
