"""One spec per algorithm: the single place that says what a strategy is.

A ``StrategySpec`` is a small frozen record registered under the strategy's run-config
name (``strategies/registry.py``). It says
- how the strategy is built from the run config (``build``);
- its client half (``client_half``: hooks into local training, extra reply arrays,
  client state);
- what travels each way and what stays on the client (``payload``);
- the reply layout the server should expect back (``reply_layout``), when the strategy
  adds arrays of its own (SCAFFOLD's Delta c_i);
- its traits: linear in the replies, allowed with SecAgg+, with user-level DP and with
  sample-level DP, robust with a minimum number of replies, its default server learning
  rate, whether it selects replies (Krum-type rules), whether it attaches per-client
  records to train messages; and, for each feature it refuses, the reason;
- cross-key config rules of its own (``check``).

The rest of the app asks the spec, never a name: config validation, the server's
wrapper stack and the client's dispatch. Adding an algorithm is one module that defines
its spec and one ``register`` call (the README's architecture section walks through it).

This module imports nothing of ``fl_app``: the run config arrives duck-typed (any object
with the run-config attributes), so the layers stay acyclic (pyproject.toml's import
contracts).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy import Strategy
from torch import nn

from fl_common.hooks import LocalHooks

from .validation import ArraySpec


@dataclass(frozen=True)
class BuildInputs:
    """What building a strategy may use besides the run config."""

    cfg: Any  # the validated run config (fl_app.config.RunConfig)
    num_clients: int  # N: partitions in the federation
    total_examples: int | None = None  # n: training examples of all known partitions
    partition_of: Callable[[int], int | None] | None = None  # node id -> partition id


@dataclass(frozen=True)
class ClientLocal:
    """Where a client keeps what stays on it between messages (for a payload that keeps
    layers locally, and for client halves): its Context.state and state folder, keyed by
    its member id (partition id) and the run."""

    state: RecordDict  # the node's Context.state
    state_dir: str | None  # where state that must survive a restart is kept (or None)
    member_id: int  # this client's id in the federation: its partition id
    run_tag: str  # the run (state of another run is not reused)
    server_round: int  # the round of the message being handled
    content: RecordDict | None = None  # the message's content (e.g. its accepted entry)
    # files this node provides by node config (e.g. FedLoRA's "lora-base"), resolved by
    # the ClientApp (a deployed node's own paths only; in simulation the server's)
    node_files: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientInputs:
    """What a client half is set up from, in one train message."""

    model: nn.Module  # already holding the global weights the message carried
    content: RecordDict  # the train message's content
    state: RecordDict  # the node's Context.state
    lr: float  # the client learning rate
    member_id: int  # this client's id in the federation: its partition id
    state_dir: str | None = None  # where state that must survive a restart is kept
    local: ClientLocal | None = None  # the same, with the run and round
    payload: "Payload | None" = None  # the spec's payload for this run


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


def plain_half(inputs: ClientInputs) -> ClientHalf:
    """The client half of a strategy that only averages: plain local training."""
    return ClientHalf()


class Payload(Protocol):
    """What travels between server and client, and what stays on the client."""

    description: str

    def check(self, model: nn.Module) -> None:
        """Raise ValueError (naming the run-config key) if the run's model cannot be
        split as this payload needs; called before training."""

    def initial(self, model: nn.Module) -> ArrayRecord:
        """The arrays the server starts the run with (and sends every round)."""

    def load(self, model: nn.Module, arrays: ArrayRecord, local: ClientLocal | None = None) -> None:
        """Load the arrays a message carried into ``model`` (and, on a client, ``local``:
        what stays on it); on the server ``local`` is None."""

    def reply(self, model: nn.Module) -> ArrayRecord:
        """The arrays of the client's model that go back in the reply."""

    def round_config(self) -> dict[str, str]:
        """Entries every message's config carries besides the run config (e.g. the
        checksum of FedLoRA's base)."""

    def final_state(self, model: nn.Module, arrays: ArrayRecord) -> dict[str, Any]:
        """The model the server saves at the end, from the global arrays (FedLoRA's
        merged model; otherwise the arrays themselves)."""


@dataclass(frozen=True)
class WholeModel:
    """Every entry of the model's state_dict travels both ways; nothing stays behind."""

    description: str = "the whole model, both ways"

    def check(self, model: nn.Module) -> None:
        return None

    def initial(self, model: nn.Module) -> ArrayRecord:
        return ArrayRecord(model.state_dict())

    def load(self, model: nn.Module, arrays: ArrayRecord, local: ClientLocal | None = None) -> None:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)

    def reply(self, model: nn.Module) -> ArrayRecord:
        return ArrayRecord(model.state_dict())

    def round_config(self) -> dict[str, str]:
        return {}

    def final_state(self, model: nn.Module, arrays: ArrayRecord) -> dict[str, Any]:
        return arrays.to_torch_state_dict()


WHOLE_MODEL = WholeModel()


class PerClientRecords(Protocol):
    """A strategy that gives each train message records of its own client (SCAFFOLD's
    accepted entry); the guard calls ``attach_accepted`` once its sampler has chosen the
    nodes and sets ``attach_later`` so the strategy does not attach them itself."""

    attach_later: bool

    def attach_accepted(self, messages: list[Message]) -> list[Message]: ...


@dataclass(frozen=True)
class Traits:
    """What the rest of the app needs to know about an algorithm."""

    # The aggregate is a function of the num-examples-weighted mean of the replies'
    # arrays only (the server optimizers post-process it): SecAgg+ can compute it from
    # the masked sum, and user-level DP's release can stand in for the replies.
    linear: bool = False
    secagg: bool = False  # allowed with SecAgg+
    user_dp: bool = False  # user-level DP keeps its guarantee
    sample_dp: bool = True  # allowed with sample-level DP-SGD
    # Byzantine-robust rules: f malicious -> the fewest replies a round needs
    min_replies: Callable[[int], int] | None = None
    default_server_lr: float = 1.0  # server-lr = "auto"
    selects: bool = False  # records which replies it aggregated (``last_selected``)
    # part of the model stays on each client: federated evaluation is the personalized
    # metric, the server's central test (without the clients' layers) is not
    personalized: bool = False
    per_client_records: bool = False  # implements PerClientRecords
    # why a feature is refused, completing "... which <reason>" (keys: user_dp, secagg)
    refusals: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StrategySpec:
    name: str  # the run-config value of 'strategy'
    reference: str  # paper (and, for Flower's built-ins, where the code is)
    build: Callable[[BuildInputs], Strategy]
    traits: Traits = field(default_factory=Traits)
    client_half: Callable[[ClientInputs], ClientHalf] = plain_half
    payload: Callable[[Any], Payload] = lambda cfg: WHOLE_MODEL  # what travels, for a config
    # expected reply layout given the arrays sent, for a strategy that adds arrays
    reply_layout: Callable[[Strategy], Callable[[ArrayRecord], dict[str, ArraySpec]]] | None = None
    # cross-key run-config rules of this algorithm: raise ValueError naming the keys
    check: Callable[[Any], None] | None = None
    # rules that need the number of nodes sampled per round: (cfg, sampled) -> None or raise
    check_sampled: Callable[[Any, int], None] | None = None
    # whether the run needs every partition's data size (e.g. a num-examples weighting)
    needs_sizes: Callable[[Any], bool] = lambda cfg: False


def fedavg_kwargs(cfg: Any) -> dict[str, Any]:
    """The sampling settings every Flower FedAvg-family strategy takes from the config.
    No federated evaluation under DP: its metrics would leave the clients un-noised."""
    return {
        "fraction_train": float(cfg.fraction_train),
        "fraction_evaluate": 0.0 if cfg.dp else float(cfg.fraction_evaluate),
        "min_train_nodes": cfg.min_train_nodes,
        "min_evaluate_nodes": 1,
        "min_available_nodes": cfg.min_train_nodes,
    }


def effective_server_lr(cfg: Any, traits: Traits) -> float:
    """``server-lr``, with ``"auto"`` replaced by the strategy's default."""
    return traits.default_server_lr if cfg.server_lr == "auto" else float(cfg.server_lr)
