"""SCAFFOLD: Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning", ICML 2020. https://arxiv.org/abs/1910.06378

Algorithm 1 with Option II control variates. The server holds the model x and the
server control variate c; client i holds its own c_i (zero at first), kept across rounds
in its node's ``Context.state``. In a round with sampled set S of the N clients:

    client i:  y_i <- x;  K times:  y_i <- y_i - eta_l * (g_i(y_i) - c_i + c)
               c_i+ = c_i - c + (x - y_i) / (K * eta_l)                 (Option II)
               Delta y_i = y_i - x,   Delta c_i = c_i+ - c_i
    server:    x <- x + eta_g * sum_S p_i Delta y_i
               c <- c + sum_S q_i Delta c_i

Symbols: eta_l = the client ``lr``, K = the client's number of optimizer steps that round,
eta_g = ``server-lr`` (``server_lr``), N = ``num_clients`` (the number of partitions).

Weighting (run-config ``scaffold-weighting``). The invariant c = sum_i q_i c_i over all N
clients, sampled or not, is what makes the correction c - c_i point from client i's
gradient to the gradient of the objective sum_i q_i f_i; the model average must aim at
the same objective, or the two pull towards different optima.
- ``num-examples`` (default): the objective FedAvg, FedProx and FedAdam optimize,
  f = sum_i (n_i / n) f_i. p_i = n_i / sum_S n_j (FedAvg's weighted mean) and
  q_i = n_i / n, with n the training examples of all N clients (``total_examples``).
  With c = c_i = 0 and eta_g = 1 this is exactly FedAvg.
- ``uniform``: the paper's f = (1/N) sum_i f_i: p_i = 1/|S|, q_i = 1/N.
(Before this was fixed, Delta y was weighted and c uniform: on unequal clients SCAFFOLD
then converged to the uniform objective's optimum while its model update aimed at the
weighted one; tests/test_scaffold.py checks both fixed points on unequal quadratics.)

How c_i+ is computed. With plain SGD, Option II's displacement formula is exactly the
mean of the client's raw (uncorrected) stochastic gradients along its K steps:
(x - y_i)/(K eta_l) = (1/K) sum_k (g_k - c_i + c), so c_i+ = (1/K) sum_k g_k. The client
accumulates that mean directly (``gradient_mean_update``). For ``momentum = 0`` the two
are the same number (tested to float tolerance against ``control_variate_update``, the
paper's formula); with momentum the displacement formula overstates the mean gradient
by up to 1/(1 - momentum) and, in our runs with momentum 0.9, made SCAFFOLD diverge
(docs/strategies.md), while the gradient mean stays what Option II means to estimate.
``control_variate="displacement"`` (run-config ``scaffold-control-variate``) selects the
paper's formula literally, for comparison.

Commit protocol: c_i changes only when the server used Delta c_i. The invariant breaks
for good if a client keeps c_i+ while the server never adds its Delta c_i (a reply lost,
timed out, rejected by the guard, left out of a round skipped for too few valid
replies, or part of an aggregate that was rolled back). So the client stores c_i+ as
*pending*, tagged with the round r it was computed in, and keeps using its committed
c_i. The server records, for every client, the last round whose contribution went into
an aggregate that stood (``accepted``; kept in the strategy, so a rolled-back round's
record is rolled back with it) and sends each sampled client its own entry of that map
(``scaffold-accepted``: {member id: round}, empty if it never counted) with its train
message. The client commits its pending c_i+ if and only if the entry says its round-r
contribution was aggregated, else drops it. (The whole map went to every client before:
~6,500 entries a message by round 10 at 10,000 clients, and it told every client who
else took part when.)
A client's member id is its partition id in the app (``member_of``; the node id by
default): node ids change when a SuperNode restarts or a run is resumed, partitions do
not.

Where c_i lives: in the node's ``Context.state``, or, with a state folder (node config
``state-dir`` in deployment; the run's ``client-state`` folder in simulation, sent by
the server), on disk only, written atomically after every round the client trains
(``scaffold-<run>-p<member>.npz``: c_i, the pending c_i+ and its round) and read at the
start of the next (the simulation keeps every node's Context.state in one process: at
10,000 clients, c_i and c_i+ in memory would be 3.7 GB and grow round over round). A restarted
SuperNode or a resumed run reloads it, and the accepted map of the server's checkpoint
decides the pending c_i+ exactly as it would have without the interruption.
The server never holds any c_i (only the Delta c_i it aggregates, which secure
aggregation can hide), and the map records only who took part when, which the server
knows anyway. A client never stores a non-finite c_i+: it keeps its previous c_i (the
reply then carries the non-finite Delta c_i and is rejected).

Wire layout: the server sends c as a second ArrayRecord (``scaffold-c``) beside the
model, and the client's entry of the accepted map as a ConfigRecord
(``scaffold-accepted``); the client
replies with ONE ArrayRecord holding its model y_i under the model's keys (Delta y_i =
y_i - x is formed on the server, which holds x) and Delta c_i under ``scaffold-dc/<key>``.
The upload is therefore twice FedAvg's (reported per round).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from functools import partial
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log
from torch import nn

from fl_common.arrays import ArrayDict
from fl_common.atomic import safe_name, write_atomic
from fl_common.hooks import LocalHooks
from fl_common.wire import CONFIG, RUN_TAG, SERVER_ROUND

from .accepted import AcceptedMap
from .spec import (
    BuildInputs,
    ClientHalf,
    ClientInputs,
    StrategySpec,
    Traits,
    effective_server_lr,
    fedavg_kwargs,
)
from .validation import ArraySpec, array_spec, array_values

C_RECORD = "scaffold-c"  # server -> client: the server control variate c
ACCEPTED_RECORD = "scaffold-accepted"  # server -> client: member id -> last aggregated round
CONTROL_VARIATE = "scaffold-control-variate"  # server -> client: how c_i+ is computed
VARIATES = ("gradient-mean", "displacement")
WEIGHTINGS = ("num-examples", "uniform")
DC_PREFIX = "scaffold-dc/"  # client -> server: Delta c_i, beside the model
STATE_CI = "scaffold-ci"  # Context.state: this client's committed c_i
STATE_PENDING = "scaffold-ci-pending"  # Context.state: c_i+ awaiting the server's word
STATE_META = "scaffold-meta"  # Context.state: run tag and the pending c_i+'s round
PENDING_ROUND = "pending-round"
COMMITTED_METRIC = "scaffold-committed"  # client -> server: 1 if it committed c_i+ this round



# ------------------------------------------------------------------ pure math
def control_variate_update(
    c_i: ArrayDict, c: ArrayDict, x: ArrayDict, y: ArrayDict, num_steps: int, lr: float
) -> tuple[ArrayDict, ArrayDict]:
    """Option II: (c_i+, Delta c_i) with c_i+ = c_i - c + (x - y) / (K * eta_l)."""
    if num_steps < 1 or not lr > 0:
        raise ValueError(f"Need K >= 1 and eta_l > 0, got K={num_steps}, eta_l={lr}")
    scale = 1.0 / (num_steps * lr)
    delta_c = {k: -c[k] + (x[k] - y[k]) * scale for k in x}
    return {k: c_i[k] + delta_c[k] for k in x}, delta_c


def gradient_mean_update(
    c_i: ArrayDict, grad_sum: ArrayDict, num_steps: int
) -> tuple[ArrayDict, ArrayDict]:
    """(c_i+, Delta c_i) with c_i+ = (1/K) * sum of the K raw local gradients."""
    if num_steps < 1:
        raise ValueError(f"Need K >= 1, got K={num_steps}")
    new_c_i = {k: grad_sum[k] / num_steps for k in grad_sum}
    return new_c_i, {k: new_c_i[k] - c_i[k] for k in grad_sum}


def aggregation_weights(
    num_examples: np.ndarray, *, weighting: str, num_clients: int, total_examples: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """(p, q): the weights of Delta y_i in the model update and of Delta c_i in the c update.

    ``num-examples``: p_i = n_i / sum_S n_j, q_i = n_i / n (n = ``total_examples``, all N
    clients); ``uniform``: p_i = 1 / |S|, q_i = 1 / N. Sums are taken in float64.
    """
    n_i = np.asarray(num_examples, dtype=np.float64)
    if n_i.ndim != 1 or len(n_i) == 0 or not np.all(np.isfinite(n_i)) or np.any(n_i <= 0):
        raise ValueError(f"Need a non-empty list of finite num-examples > 0, got {num_examples!r}")
    if not 0 < len(n_i) <= num_clients:
        raise ValueError(f"Need 0 < |S| <= N, got |S|={len(n_i)}, N={num_clients}")
    if weighting == "uniform":
        return np.full(len(n_i), 1.0 / len(n_i)), np.full(len(n_i), 1.0 / num_clients)
    if weighting != "num-examples":
        raise ValueError(f"SCAFFOLD weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
    if total_examples is None or not total_examples >= n_i.sum():
        raise ValueError(f"SCAFFOLD's num-examples weighting needs n (the training examples of "
                         f"all N clients) >= the sampled clients' sum {n_i.sum():g}; got "
                         f"{total_examples!r}")
    return n_i / n_i.sum(), n_i / float(total_examples)


def server_update(
    x: ArrayDict, c: ArrayDict, mean_delta_y: ArrayDict, c_increment: ArrayDict, *, server_lr: float
) -> tuple[ArrayDict, ArrayDict]:
    """x + eta_g * sum_S p_i Delta y_i,   c + sum_S q_i Delta c_i (both sums given)."""
    new_x = {k: (x[k] + server_lr * mean_delta_y[k]).astype(x[k].dtype) for k in x}
    new_c = {k: (c[k] + c_increment[k]).astype(c[k].dtype) for k in c}
    return new_x, new_c


def weighted_sum(arrays: list[ArrayDict], weights: np.ndarray, keys: Iterable[str],
                 minus: ArrayDict | None = None) -> ArrayDict:
    """sum_j weights[j] * (arrays[j][k] - minus[k]) for every key (``minus`` absent: 0),
    accumulated in float64 one key at a time (no float64 copy of every array at once)."""
    def term(a: np.ndarray, k: str) -> np.ndarray:
        values = a.astype(np.float64)
        return values - minus[k] if minus is not None else values

    return {k: sum(float(w) * term(a[k], k) for w, a in zip(weights, arrays)) for k in keys}


def split_reply(record: ArrayRecord) -> tuple[ArrayDict, ArrayDict]:
    """(model arrays y_i, Delta c_i) from one reply's ArrayRecord."""
    model, delta_c = {}, {}
    for key, array in record.items():
        if key.startswith(DC_PREFIX):
            delta_c[key[len(DC_PREFIX):]] = array_values(array)
        else:
            model[key] = array_values(array)
    return model, delta_c


def _record(arrays: ArrayDict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _finite(arrays: ArrayDict) -> bool:
    return all(np.all(np.isfinite(v)) for v in arrays.values())


# ------------------------------------------------------------------ server side
class Scaffold(AcceptedMap, FedAvg):
    """Server side of SCAFFOLD (see the module docstring for the update rule).

    ``total_examples`` is n, the training examples of all N clients (needed by the
    default ``num-examples`` weighting; the ServerApp knows it from the partition sizes).
    """

    def __init__(self, *, num_clients: int, server_lr: float = 1.0,
                 control_variate: str = "gradient-mean", weighting: str = "num-examples",
                 total_examples: float | None = None,
                 member_of: Callable[[int], int | None] | None = None, **fedavg_kwargs) -> None:
        if control_variate not in VARIATES:
            raise ValueError(f"SCAFFOLD control_variate must be one of {list(VARIATES)}, "
                             f"got {control_variate!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"SCAFFOLD weighting must be one of {list(WEIGHTINGS)}, "
                             f"got {weighting!r}")
        if num_clients < 1:
            raise ValueError(f"SCAFFOLD num_clients (N) must be >= 1, got {num_clients}")
        if not server_lr > 0:
            raise ValueError(f"SCAFFOLD server_lr (eta_g) must be > 0, got {server_lr}")
        if weighting == "num-examples" and (total_examples is None or not total_examples > 0):
            raise ValueError("SCAFFOLD with num-examples weighting needs total_examples (n, the "
                             f"training examples of all N clients) > 0, got {total_examples!r}")
        super().__init__(**fedavg_kwargs)
        self.num_clients = num_clients
        self.server_lr = float(server_lr)
        self.control_variate = control_variate
        self.weighting = weighting
        self.total_examples = None if total_examples is None else float(total_examples)
        self.c: ArrayDict | None = None
        self.x: ArrayDict | None = None
        # member id -> last round its Delta c_i was added (strategies/accepted.py)
        self.init_accepted(ACCEPTED_RECORD, member_of)

    def summary(self) -> None:
        log(INFO, "\t├──> SCAFFOLD (Option II, %s, %s weighting): eta_g = %g, N = %d",
            self.control_variate, self.weighting, self.server_lr, self.num_clients)
        super().summary()

    def reply_array_spec(self, arrays: ArrayRecord) -> dict[str, ArraySpec]:
        """What a valid reply holds: the model's layout plus Delta c_i for every key."""
        spec = array_spec(arrays)
        return {**spec, **{DC_PREFIX + k: s for k, s in spec.items()}}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.x = {k: a.numpy() for k, a in arrays.items()}
        if self.c is None:
            self.c = {k: np.zeros_like(v) for k, v in self.x.items()}
        config[CONTROL_VARIATE] = self.control_variate
        messages = list(super().configure_train(server_round, arrays, config, grid))
        c_record = _record(self.c)
        for content in {id(m.content): m.content for m in messages}.values():
            content[C_RECORD] = c_record
        # A wrapper that picks the nodes itself (Guarded's seeded sampler re-addresses
        # shared content) attaches the entries once the nodes are final.
        return messages if self.attach_later else self.attach_accepted(messages)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        if self.x is None or self.c is None:
            raise RuntimeError("SCAFFOLD.aggregate_train called before configure_train")
        contents = [m.content for m in valid]
        num_examples = np.array([float(next(iter(c.metric_records.values()))[self.weighted_by_key])
                                 for c in contents])
        p, q = aggregation_weights(num_examples, weighting=self.weighting,
                                   num_clients=self.num_clients, total_examples=self.total_examples)
        parts = [split_reply(next(iter(c.array_records.values()))) for c in contents]  # views
        # sum_S p_i (y_i - x) without a float64 copy of every reply at once (1,000 replies
        # of the default CNN would hold 375 MB)
        mean_dy = weighted_sum([y for y, _ in parts], p, self.x, minus=self.x)
        c_increment = weighted_sum([dc for _, dc in parts], q, self.c)
        new_x, self.c = server_update(self.x, self.c, mean_dy, c_increment,
                                      server_lr=self.server_lr)
        self.mark_accepted(server_round, valid)
        return _record(new_x), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def state_dict(self) -> dict:
        """Server state to checkpoint beside the global model: c and the accepted map."""
        return {"c": None if self.c is None else {k: v.copy() for k, v in self.c.items()},
                "accepted": dict(self.accepted)}

    def load_state_dict(self, state: dict) -> None:
        self.c = None if state["c"] is None else {k: np.array(v) for k, v in state["c"].items()}
        self.accepted = {int(k): int(v) for k, v in state.get("accepted", {}).items()}


# ------------------------------------------------------------------ client side
def scaffold_file(state_dir: str | Path, run_tag: str, member_id: int) -> Path:
    """Where a client keeps its c_i on disk: keyed by run and member (partition) id."""
    return Path(state_dir).expanduser() / f"scaffold-{safe_name(run_tag)}-p{int(member_id)}.npz"


def save_client_state(state: RecordDict, path: Path) -> None:
    """c_i, the pending c_i+ and their meta data, written to a temporary file, flushed,
    then renamed: a crash leaves the previous file or the new one, never half of one."""
    arrays: dict[str, np.ndarray] = {}
    for prefix, key in (("ci/", STATE_CI), ("pending/", STATE_PENDING)):
        if key in state:
            arrays.update({prefix + k: a.numpy() for k, a in state[key].items()})
    meta = dict(state[STATE_META]) if STATE_META in state else {}
    arrays["meta"] = np.array(json.dumps(meta))
    write_atomic(path, lambda handle: np.savez(handle, **arrays))


def load_client_state(state: RecordDict, path: Path, run_tag: str) -> None:
    """Fill ``state`` from ``path`` when it holds nothing of this run (a restarted node,
    a resumed run); a damaged file is an error, not a silent c_i = 0 (the server's c
    still counts this client's c_i)."""
    meta = state.get(STATE_META)
    if (meta is not None and meta.get(RUN_TAG) == run_tag) or not path.exists():
        return
    try:
        with np.load(path) as data:
            saved = json.loads(str(data["meta"]))
            groups: dict[str, ArrayDict] = {"ci/": {}, "pending/": {}}
            for name in data.files:
                for prefix, group in groups.items():
                    if name.startswith(prefix):
                        group[name[len(prefix):]] = data[name]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"Cannot read this client's SCAFFOLD state {path} ({err}); the "
                         "server's c counts its c_i, so training without it would break "
                         "c = sum_i q_i c_i. Restore the file or start a new run") from None
    if saved.get(RUN_TAG) != run_tag:
        return
    if groups["ci/"]:
        state[STATE_CI] = _record(groups["ci/"])
    if groups["pending/"]:
        state[STATE_PENDING] = _record(groups["pending/"])
    state[STATE_META] = ConfigRecord(saved)


def resolve_pending(state: RecordDict, run_tag: str, member_id: int, accepted: ConfigRecord) -> bool:
    """Commit or drop this client's pending c_i+ by the server's accepted map (in place);
    True if it was committed.

    State from another run (another ``run_tag``) is cleared: c_i starts at zero.
    """
    meta = state.get(STATE_META)
    if meta is None or meta.get(RUN_TAG) != run_tag:
        for key in (STATE_CI, STATE_PENDING, STATE_META):
            if key in state:
                del state[key]
        return False
    committed = False
    if STATE_PENDING in state:
        if accepted.get(str(member_id)) == meta.get(PENDING_ROUND):
            state[STATE_CI] = state[STATE_PENDING]
            committed = True
        del state[STATE_PENDING]
    return committed


def correct_gradients(grad_sum: dict[str, torch.Tensor], correction: dict[str, torch.Tensor],
                      model: nn.Module) -> None:
    """After each backward pass: add the raw gradient g_k to ``grad_sum`` (for c_i+), then
    correct it in place, g_k + (c - c_i) (the client step in the module docstring)."""
    for name, param in model.named_parameters():
        if param.grad is not None:
            grad_sum[name].add_(param.grad)  # the raw gradient g_k, before correcting
            param.grad.add_(correction[name])


class ScaffoldClient:
    """Client half: corrects every local gradient by (c - c_i), then computes c_i+ (the
    mean raw gradient, Option II, see the module docstring) and keeps it pending.

    Use ``hooks`` in ``train_local``; afterwards ``finish(model, steps)`` returns the
    Delta c_i arrays for the reply and stores c_i+ as pending in the node's state.
    ``metrics()`` tells the server whether this round started by committing the previous
    c_i+ (``scaffold-committed``, 0 or 1: a round-level sanity check of the protocol).
    """

    def __init__(self, model: nn.Module, content: RecordDict, state: RecordDict,
                 run_tag: str, lr: float, *, member_id: int, server_round: int,
                 state_dir: str | None = None) -> None:
        if C_RECORD not in content:
            raise ValueError(f"SCAFFOLD client: the train message carries no '{C_RECORD}' record")
        self.variate = str(content["config"].get(CONTROL_VARIATE, VARIATES[0]))
        if self.variate not in VARIATES:
            raise ValueError(f"SCAFFOLD client: unknown control variate {self.variate!r}")
        self.lr = lr
        self.state = state
        self.run_tag = run_tag
        self.server_round = int(server_round)
        self.x = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
        self.c = {k: a.numpy() for k, a in content[C_RECORD].items()}
        if set(self.c) != set(self.x):
            raise ValueError("SCAFFOLD client: c and the model have different keys")
        accepted = content[ACCEPTED_RECORD] if ACCEPTED_RECORD in content else ConfigRecord()
        self.path = scaffold_file(state_dir, run_tag, member_id) if state_dir else None
        if self.path is not None:
            load_client_state(state, self.path, run_tag)
        self.committed = resolve_pending(state, run_tag, member_id, accepted)
        self.c_i = self._committed_c_i()
        params = dict(model.named_parameters())
        self.correction = {k: torch.from_numpy(self.c[k] - self.c_i[k]).to(p.device)
                           for k, p in params.items()}
        self.grad_sum = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
        # Not a bound method: a hook holding ``self`` would make a reference cycle that
        # keeps this client's ~0.6 MB of tensors alive until Python's cyclic collector
        # runs (it grew a simulation worker by ~10 MiB a round at 1,000 nodes).
        self.hooks = LocalHooks(after_backward=partial(correct_gradients, self.grad_sum,
                                                       self.correction))

    def metrics(self) -> dict[str, int]:
        return {COMMITTED_METRIC: int(self.committed)}

    def _committed_c_i(self) -> ArrayDict:
        if STATE_CI in self.state:
            return {k: a.numpy() for k, a in self.state[STATE_CI].items()}
        return {k: np.zeros_like(v) for k, v in self.x.items()}  # c_i starts at zero

    def finish(self, model: nn.Module, num_steps: int) -> dict[str, np.ndarray]:
        if self.variate == "displacement":
            y = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
            new_c_i, _ = control_variate_update(self.c_i, self.c, self.x, y, num_steps, self.lr)
        else:
            grad_sum = {k: self.grad_sum[k].cpu().numpy() if k in self.grad_sum else np.zeros_like(v)
                        for k, v in self.x.items()}
            new_c_i, _ = gradient_mean_update(self.c_i, grad_sum, num_steps)
        # Delta c_i from the stored (model-dtype) c_i+, so that what the server adds is
        # exactly what the client commits.
        new_c_i = {k: v.astype(self.x[k].dtype) for k, v in new_c_i.items()}
        delta_c = {k: (new_c_i[k].astype(np.float64) - self.c_i[k]).astype(self.x[k].dtype)
                   for k in new_c_i}
        self.state[STATE_META] = ConfigRecord({RUN_TAG: self.run_tag,
                                               PENDING_ROUND: self.server_round})
        if _finite(new_c_i) and _finite(delta_c):
            self.state[STATE_PENDING] = _record(new_c_i)
        else:
            log(WARNING, "SCAFFOLD client: c_i+ is not finite (local training diverged); "
                         "keeping the previous c_i")
        if self.path is not None:  # on disk only: the simulation holds every node's
            save_client_state(self.state, self.path)  # Context.state, 2 x 190 KB each
            for key in (STATE_CI, STATE_PENDING, STATE_META):
                if key in self.state:
                    del self.state[key]
        return {DC_PREFIX + k: v for k, v in delta_c.items()}


# ---------------------------------------------------------------------- the spec
def _build(b: BuildInputs) -> Scaffold:
    cfg = b.cfg
    return Scaffold(**fedavg_kwargs(cfg), num_clients=b.num_clients,
                    server_lr=effective_server_lr(cfg, TRAITS), control_variate=cfg.scaffold_control_variate,
                    weighting=cfg.scaffold_weighting, total_examples=b.total_examples,
                    member_of=b.partition_of)


def _client_half(inputs: ClientInputs) -> ClientHalf:
    config = inputs.content[CONFIG]
    client = ScaffoldClient(inputs.model, inputs.content, inputs.state, str(config[RUN_TAG]),
                            inputs.lr, member_id=inputs.member_id,
                            server_round=int(config[SERVER_ROUND]), state_dir=inputs.state_dir)
    return ClientHalf(hooks=client.hooks, finish=client.finish, metrics=client.metrics)


def _check(cfg) -> None:
    if cfg.secagg and cfg.scaffold_weighting != "num-examples":
        raise ValueError(
            "Run config 'secagg' = true needs 'scaffold-weighting' = \"num-examples\": the "
            "protocol reveals the num-examples-weighted sums, from which SCAFFOLD's default "
            "weighting follows exactly; the uniform weighting would need each client's "
            "weight to be 1 in the model average too")


TRAITS = Traits(
    linear=False,  # two statistics: Delta y and Delta c_i, the second unclipped
    secagg=True,  # both are num-examples-weighted sums (see strategies/secagg.py)
    user_dp=False,
    default_server_lr=1.0,
    per_client_records=True,
    refusals={"user_dp": "SCAFFOLD extends with a second, unclipped statistic (Delta c_i)"},
)
SPEC = StrategySpec(
    name="scaffold",
    reference="Karimireddy et al., SCAFFOLD: Stochastic Controlled Averaging for Federated "
              "Learning, ICML 2020 (Option II)",
    build=_build,
    traits=TRAITS,
    client_half=_client_half,
    reply_layout=lambda strategy: strategy.reply_array_spec,
    check=_check,
    needs_sizes=lambda cfg: cfg.scaffold_weighting == "num-examples",
)
