"""The strategies: one spec per algorithm (``strategies/spec.py``), registered here.

The ServerApp builds the strategy a run config names from its spec and wraps it in
``guard.Guarded`` (reply validation, deterministic partition-aware sampling, round
statistics) and whatever the run asks for and the spec's traits allow (SecAgg+,
user-level DP, the attack simulation), so the strategy classes stay exactly the
algorithm.

Our own implementations, one module each, server and client half and spec together:
``fedprox`` (Li et al. 2020), ``scaffold`` (Karimireddy et al. 2020, Option II),
``fedadam`` (Reddi et al. 2021), ``krum`` and ``multikrum`` (Blanchard et al. 2017),
``fedper`` (Arivazhagan et al. 2019) and ``fedlora`` (LoRA adapters with ``peft``).

Flower's built-ins are here as comparison baselines (``builtins.py``, ``bulyan.py``):
``fedavg`` (McMahan et al. 2017), ``fedavgm`` (Hsu et al. 2019), ``fedyogi`` and
``fedadagrad`` (Reddi et al. 2021), ``fedmedian`` (Yin et al. 2018), ``fedtrimmedavg``
(Yin et al. 2018), ``bulyan`` (El Mhamdi et al. 2018).

A new algorithm: a module with its Strategy (and client half) and a ``SPEC``, and one
``register`` line below (the README's architecture section has a worked example).
"""

from __future__ import annotations

from fl_common import keep_root_logger_quiet

keep_root_logger_quiet()  # before any module imports Opacus

from typing import Any

from flwr.serverapp.strategy import Strategy

from . import bulyan, builtins, fedadam, fedlora, fedper, fedprox, krum, scaffold
from .guard import Guarded
from .registry import names, register, spec, with_trait
from .scaffold import VARIATES as SCAFFOLD_VARIATES  # noqa: F401  (config choices)
from .scaffold import WEIGHTINGS as SCAFFOLD_WEIGHTINGS  # noqa: F401
from .spec import BuildInputs, ClientHalf, ClientInputs, ClientLocal, StrategySpec  # noqa: F401

for _spec in (builtins.FEDAVG, fedprox.SPEC, scaffold.SPEC, fedadam.SPEC, builtins.FEDAVGM,
              builtins.FEDYOGI, builtins.FEDADAGRAD, builtins.FEDMEDIAN, builtins.FEDTRIMMEDAVG,
              krum.KRUM_SPEC, krum.MULTIKRUM_SPEC, bulyan.SPEC, fedper.SPEC, fedlora.SPEC):
    register(_spec)

NAMES: tuple[str, ...] = names()


def build(cfg: Any, num_clients: int, total_examples: int | None = None,
          partition_of=None) -> Strategy:
    """The bare strategy ``cfg.strategy`` names (not yet wrapped by ``Guarded``).

    ``num_clients`` is the number of partitions (N in SCAFFOLD's c update);
    ``total_examples`` the training examples of all of them (n in SCAFFOLD's
    num-examples weighting); ``partition_of``: node id -> partition id.
    """
    return spec(cfg.strategy).build(BuildInputs(cfg, num_clients, total_examples, partition_of))


def guarded(name: str, strategy: Strategy, *, inner: Strategy | None = None,
            **kwargs: Any) -> Guarded:
    """``Guarded(inner or strategy)`` set up as strategy ``name``'s spec says: the reply
    layout to validate against and the per-client records to attach (taken from
    ``strategy``, the bare algorithm, when ``inner`` wraps it)."""
    return Guarded(inner if inner is not None else strategy,
                   reply_layout=reply_layout(name, strategy),
                   per_client=strategy if spec(name).traits.per_client_records else None,
                   **kwargs)


def reply_layout(name: str, strategy: Strategy):
    """The reply layout strategy ``name``'s spec expects, or None (the arrays sent)."""
    s = spec(name)
    return s.reply_layout(strategy) if s.reply_layout is not None else None


def sampled_per_round(cfg: Any, num_nodes: int) -> int:
    """How many nodes FedAvg's ``configure_train`` samples: max(int(N * fraction), min)."""
    return max(int(num_nodes * float(cfg.fraction_train)), cfg.min_train_nodes)


def check_feasible(cfg: Any, num_nodes: int) -> None:
    """Raise before training if the strategy can never aggregate with ``num_nodes`` nodes."""
    min_replies = spec(cfg.strategy).traits.min_replies
    if min_replies is None:
        return
    f = cfg.num_malicious
    need = min_replies(f)
    sampled = min(sampled_per_round(cfg, num_nodes), num_nodes)
    if sampled < need:
        largest = max((g for g in range(sampled + 1) if min_replies(g) <= sampled), default=None)
        fix = (f"lower 'num-malicious' to at most {largest} (the largest f the {sampled} sampled "
               "nodes allow)" if largest is not None else
               f"raise 'fraction-train' or add nodes (even f = 0 needs {min_replies(0)})")
        raise ValueError(
            f"Strategy {cfg.strategy!r} with 'num-malicious' = {f} needs at least {need} "
            f"replies per round, but only {sampled} of the {num_nodes} nodes are sampled "
            f"('fraction-train' = {cfg.fraction_train}, 'min-train-nodes' = "
            f"{cfg.min_train_nodes}); raise 'fraction-train' or {fix}"
        )
    if (check := spec(cfg.strategy).check_sampled) is not None:
        check(cfg, sampled)


__all__ = ["NAMES", "BuildInputs", "ClientHalf", "ClientInputs", "StrategySpec", "build",
           "check_feasible", "guarded", "names", "register", "reply_layout",
           "sampled_per_round", "spec", "with_trait"]
