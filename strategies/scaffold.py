"""SCAFFOLD: Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning", ICML 2020. https://arxiv.org/abs/1910.06378

Algorithm 1 with Option II control variates. The server holds the model x and the
server control variate c; client i holds its own c_i (zero at first), kept across rounds
in its node's ``Context.state``. In a round with sampled set S of the N clients:

    client i:  y_i <- x;  K times:  y_i <- y_i - eta_l * (g_i(y_i) - c_i + c)
               c_i+ = c_i - c + (x - y_i) / (K * eta_l)                 (Option II)
               Delta y_i = y_i - x,   Delta c_i = c_i+ - c_i,   c_i <- c_i+
    server:    x <- x + eta_g * mean_S(Delta y_i)
               c <- c + (|S| / N) * mean_S(Delta c_i)

Symbols: eta_l = the client ``lr``, K = the client's number of optimizer steps that round,
eta_g = ``server-lr`` (``server_lr``), N = ``num_clients`` (the number of partitions).
The c update keeps c = (1/N) * sum_i c_i over all N clients, sampled or not.

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

Deliberate departure: mean_S(Delta y_i) is weighted by num-examples, as FedAvg (and
NIID-Bench's SCAFFOLD) do: SCAFFOLD with c = c_i = 0 and eta_g = 1 is then exactly
FedAvg. The paper's uniform mean is the same when clients hold equally many samples.
mean_S(Delta c_i) stays uniform, as in the paper, since c must stay the plain mean of
the c_i.

Wire layout: the server sends c as a second ArrayRecord (``scaffold-c``) beside the
model; the client replies with ONE ArrayRecord holding its model y_i under the model's
keys (Delta y_i = y_i - x is formed on the server, which holds x) and Delta c_i under
``scaffold-dc/<key>``. The upload is therefore twice FedAvg's (reported per round).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log
from torch import nn

from fl_app.training import LocalHooks
from fl_app.wire import RUN_TAG

from .validation import ArraySpec, array_spec

C_RECORD = "scaffold-c"  # server -> client: the server control variate c
CONTROL_VARIATE = "scaffold-control-variate"  # server -> client: how c_i+ is computed
VARIATES = ("gradient-mean", "displacement")
DC_PREFIX = "scaffold-dc/"  # client -> server: Delta c_i, beside the model
STATE_CI = "scaffold-ci"  # Context.state: this client's c_i
STATE_META = "scaffold-meta"  # Context.state: which run c_i belongs to (wire.RUN_TAG)

NDArrays = dict[str, np.ndarray]


# ------------------------------------------------------------------ pure math
def control_variate_update(
    c_i: NDArrays, c: NDArrays, x: NDArrays, y: NDArrays, num_steps: int, lr: float
) -> tuple[NDArrays, NDArrays]:
    """Option II: (c_i+, Delta c_i) with c_i+ = c_i - c + (x - y) / (K * eta_l)."""
    if num_steps < 1 or not lr > 0:
        raise ValueError(f"Need K >= 1 and eta_l > 0, got K={num_steps}, eta_l={lr}")
    scale = 1.0 / (num_steps * lr)
    delta_c = {k: -c[k] + (x[k] - y[k]) * scale for k in x}
    return {k: c_i[k] + delta_c[k] for k in x}, delta_c


def gradient_mean_update(
    c_i: NDArrays, grad_sum: NDArrays, num_steps: int
) -> tuple[NDArrays, NDArrays]:
    """(c_i+, Delta c_i) with c_i+ = (1/K) * sum of the K raw local gradients."""
    if num_steps < 1:
        raise ValueError(f"Need K >= 1, got K={num_steps}")
    new_c_i = {k: grad_sum[k] / num_steps for k in grad_sum}
    return new_c_i, {k: new_c_i[k] - c_i[k] for k in grad_sum}


def server_update(
    x: NDArrays,
    c: NDArrays,
    mean_delta_y: NDArrays,
    mean_delta_c: NDArrays,
    *,
    num_sampled: int,
    num_clients: int,
    server_lr: float,
) -> tuple[NDArrays, NDArrays]:
    """x + eta_g * mean(Delta y),  c + (|S| / N) * mean(Delta c)."""
    if not 0 < num_sampled <= num_clients:
        raise ValueError(f"Need 0 < |S| <= N, got |S|={num_sampled}, N={num_clients}")
    frac = num_sampled / num_clients
    new_x = {k: (x[k] + server_lr * mean_delta_y[k]).astype(x[k].dtype) for k in x}
    new_c = {k: (c[k] + frac * mean_delta_c[k]).astype(c[k].dtype) for k in c}
    return new_x, new_c


def split_reply(record: ArrayRecord) -> tuple[NDArrays, NDArrays]:
    """(model arrays y_i, Delta c_i) from one reply's ArrayRecord."""
    model, delta_c = {}, {}
    for key, array in record.items():
        if key.startswith(DC_PREFIX):
            delta_c[key[len(DC_PREFIX):]] = array.numpy()
        else:
            model[key] = array.numpy()
    return model, delta_c


def _record(arrays: NDArrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


# ------------------------------------------------------------------ server side
class Scaffold(FedAvg):
    """Server side of SCAFFOLD (see the module docstring for the update rule)."""

    def __init__(self, *, num_clients: int, server_lr: float = 1.0,
                 control_variate: str = "gradient-mean", **fedavg_kwargs) -> None:
        if control_variate not in VARIATES:
            raise ValueError(f"SCAFFOLD control_variate must be one of {list(VARIATES)}, "
                             f"got {control_variate!r}")
        if num_clients < 1:
            raise ValueError(f"SCAFFOLD num_clients (N) must be >= 1, got {num_clients}")
        if not server_lr > 0:
            raise ValueError(f"SCAFFOLD server_lr (eta_g) must be > 0, got {server_lr}")
        super().__init__(**fedavg_kwargs)
        self.num_clients = num_clients
        self.server_lr = float(server_lr)
        self.control_variate = control_variate
        self.c: NDArrays | None = None
        self.x: NDArrays | None = None

    def summary(self) -> None:
        log(INFO, "\t├──> SCAFFOLD (Option II, %s): eta_g = %g, N = %d", self.control_variate,
            self.server_lr, self.num_clients)
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
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        if self.x is None or self.c is None:
            raise RuntimeError("SCAFFOLD.aggregate_train called before configure_train")
        contents = [m.content for m in valid]
        weights = np.array([float(next(iter(c.metric_records.values()))[self.weighted_by_key])
                            for c in contents])
        weights = weights / weights.sum()
        parts = [split_reply(next(iter(c.array_records.values()))) for c in contents]
        mean_dy = {k: sum(w * (y[k] - self.x[k]) for w, (y, _) in zip(weights, parts))
                   for k in self.x}
        mean_dc = {k: sum(dc[k] for _, dc in parts) / len(parts) for k in self.c}
        new_x, self.c = server_update(
            self.x, self.c, mean_dy, mean_dc,
            num_sampled=len(parts), num_clients=self.num_clients, server_lr=self.server_lr,
        )
        return _record(new_x), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def state_dict(self) -> dict[str, NDArrays | None]:
        """Server state to checkpoint beside the global model."""
        return {"c": None if self.c is None else {k: v.copy() for k, v in self.c.items()}}

    def load_state_dict(self, state: dict[str, NDArrays | None]) -> None:
        self.c = None if state["c"] is None else {k: np.array(v) for k, v in state["c"].items()}


# ------------------------------------------------------------------ client side
class ScaffoldClient:
    """Client half: corrects every local gradient by (c - c_i), then updates c_i to the
    mean raw gradient (Option II, see the module docstring).

    Use ``hooks`` in ``train_local``; afterwards ``finish(model, steps)`` returns the
    Delta c_i arrays for the reply and stores c_i+ in the node's state.
    """

    def __init__(self, model: nn.Module, content: RecordDict, state: RecordDict,
                 run_tag: str, lr: float) -> None:
        if C_RECORD not in content:
            raise ValueError(f"SCAFFOLD client: the train message carries no '{C_RECORD}' record")
        self.variate = str(content["config"].get(CONTROL_VARIATE, VARIATES[0]))
        if self.variate not in VARIATES:
            raise ValueError(f"SCAFFOLD client: unknown control variate {self.variate!r}")
        self.lr = lr
        self.state = state
        self.run_tag = run_tag
        self.x = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
        self.c = {k: a.numpy() for k, a in content[C_RECORD].items()}
        if set(self.c) != set(self.x):
            raise ValueError("SCAFFOLD client: c and the model have different keys")
        self.c_i = self._stored_c_i()
        params = dict(model.named_parameters())
        self.correction = {k: torch.from_numpy(self.c[k] - self.c_i[k]) for k in params}
        self.grad_sum = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
        self.hooks = LocalHooks(after_backward=self._correct)

    def _stored_c_i(self) -> NDArrays:
        meta = self.state.get(STATE_META)
        if STATE_CI in self.state and meta is not None and meta.get(RUN_TAG) == self.run_tag:
            return {k: a.numpy() for k, a in self.state[STATE_CI].items()}
        return {k: np.zeros_like(v) for k, v in self.x.items()}  # c_i starts at zero

    def _correct(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if param.grad is not None:
                self.grad_sum[name].add_(param.grad)  # the raw gradient g_k, before correcting
                param.grad.add_(self.correction[name])

    def finish(self, model: nn.Module, num_steps: int) -> dict[str, np.ndarray]:
        if self.variate == "displacement":
            y = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
            new_c_i, delta_c = control_variate_update(self.c_i, self.c, self.x, y, num_steps, self.lr)
        else:
            grad_sum = {k: self.grad_sum[k].numpy() if k in self.grad_sum else np.zeros_like(v)
                        for k, v in self.x.items()}
            new_c_i, delta_c = gradient_mean_update(self.c_i, grad_sum, num_steps)
        self.state[STATE_CI] = _record({k: v.astype(self.x[k].dtype) for k, v in new_c_i.items()})
        self.state[STATE_META] = ConfigRecord({RUN_TAG: self.run_tag})
        return {DC_PREFIX + k: v.astype(self.x[k].dtype) for k, v in delta_c.items()}
