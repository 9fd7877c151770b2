"""The node's own privacy policy: rules a SuperNode enforces whatever the server sends.

The run config comes from the server, and so would every DP parameter if the client
took them on trust: whether DP is on, sigma, the budget, and the run name that keys the
accountant. A SuperNode that holds private data sets its own rules in its node config
(``flower-supernode --node-config '... dp-required=true dp-min-noise-multiplier=0.8
dp-max-epsilon=8 state-dir="..."'``); a train message that would break one gets an error
reply naming the rule (code ``wire.DP_POLICY_ERROR_CODE``, reason starting with
``wire.DP_POLICY_REFUSED``), which the server counts and leaves out, and the node trains
nothing.

Node-config keys (all optional; a node with none of them has no policy):
- ``dp-required`` (true/false): refuse every train message of a run without sample-level
  DP-SGD. A policy only accepts ``dp-mode = "sample"``: that is the noise the node adds
  itself; user-level noise is added by the server, which the policy does not trust.
- ``dp-min-noise-multiplier`` (> 0): refuse a round whose sigma is smaller.
- ``dp-max-epsilon`` (> 0): refuse a round after which the node's total spend (over every
  run that trained on its data, see below) would exceed this, at ``dp-delta``.
- ``dp-delta`` (in (0, 1), default 1e-5): the delta the node's own epsilon is measured at.
A node with a policy also refuses ``dp-randomness = "seeded"`` (noise the server can
regenerate) and never reports its label counts or data size in a query reply.

Where the accountant lives. In deployment the node's ``state-dir`` holds one accountant
per partition for every run that trained on it, composed across runs ("node" scope): a
new run name does not start a fresh epsilon on the same data. In simulation (Flower's
engine, where the benchmark partitions are the experiment's own) each run keeps its own,
in the run's client-state folder, as before. A deployed node without ``state-dir`` could
forget its spend on a restart: it refuses sample-level DP (and says so to the server's
query, which refuses such a run before training); the server-sent client-state folder is
honoured only in simulation (a server must not choose where a device writes).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Mapping

from fl_common import wire

REQUIRED, MIN_NOISE, MAX_EPSILON, DELTA = ("dp-required", "dp-min-noise-multiplier",
                                           "dp-max-epsilon", "dp-delta")
KEYS = (REQUIRED, MIN_NOISE, MAX_EPSILON, DELTA)
DEFAULT_DELTA = 1e-5


def in_simulation() -> bool:
    """True inside Flower's simulation engine, whose ClientApps run in Ray actors; a
    deployed SuperNode (or its ``flwr-clientapp`` process) is never one. A server cannot
    make a device believe otherwise: nothing it sends is read here."""
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        return bool(ray.is_initialized()) and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - any failure: not a Ray actor
        return False


def ray_node_id() -> str | None:
    """The Ray node this simulated ClientApp runs on (None outside a Ray actor)."""
    if not in_simulation():
        return None
    import ray

    return str(ray.get_runtime_context().get_node_id())


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"Node config '{key}' must be true or false; got {value!r}")


def _number(key: str, value: Any, *, low: float, high: float = float("inf"),
            closed_low: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    ok = (low <= number if closed_low else low < number) and number < high
    if isinstance(value, bool) or not ok:
        interval = f"{'[' if closed_low else '('}{low:g}, {high:g})"
        raise ValueError(f"Node config '{key}' must be a number in {interval}; got {value!r}")
    return number


@dataclass(frozen=True)
class NodePolicy:
    required: bool = False
    min_noise_multiplier: float = 0.0
    max_epsilon: float = 0.0  # 0: no cap of the node's own
    delta: float = DEFAULT_DELTA

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "NodePolicy | None":
        """The node's policy, or None when its node config sets no policy key; a
        malformed value raises ValueError naming the key and what is accepted."""
        if not any(k in node_config for k in KEYS):
            return None
        return cls(
            required=_flag(REQUIRED, node_config.get(REQUIRED, False)),
            min_noise_multiplier=_number(MIN_NOISE, node_config.get(MIN_NOISE, 0.0), low=0.0,
                                         closed_low=True),
            max_epsilon=_number(MAX_EPSILON, node_config.get(MAX_EPSILON, 0.0), low=0.0,
                                closed_low=True),
            delta=_number(DELTA, node_config.get(DELTA, DEFAULT_DELTA), low=0.0, high=1.0),
        )

    def refuse_run(self, cfg) -> str | None:
        """Why this node will not train for ``cfg`` at all (before any data is touched),
        or None."""
        if not cfg.dp:
            return (f"{wire.DP_POLICY_REFUSED}: node config '{REQUIRED}' asks for DP-SGD; "
                    "the run has dp = false") if self.required else None
        if cfg.dp_mode != "sample":
            return (f"{wire.DP_POLICY_REFUSED}: this node's privacy policy accepts only "
                    "dp-mode \"sample\" (noise the node adds itself); the run asks for "
                    f"dp-mode {cfg.dp_mode!r}, whose noise the server adds")
        if cfg.dp_randomness != "secure":
            return (f"{wire.DP_POLICY_REFUSED}: dp-randomness = {cfg.dp_randomness!r} lets "
                    "the server regenerate the noise; this node accepts only \"secure\"")
        return None

    def refuse_noise(self, sigma: float) -> str | None:
        if sigma < self.min_noise_multiplier:
            return (f"{wire.DP_POLICY_REFUSED}: noise multiplier {sigma:.4g} is below node config "
                    f"'{MIN_NOISE}' = {self.min_noise_multiplier:g}")
        return None

    def refuse_spend(self, spent: float, after: float) -> str | None:
        if self.max_epsilon > 0 and after > self.max_epsilon:
            return (f"{wire.DP_POLICY_REFUSED}: this node has spent epsilon {spent:.3f} (delta "
                    f"{self.delta:g}); this round would reach {after:.3f} > node config "
                    f"'{MAX_EPSILON}' = {self.max_epsilon:g}")
        return None
