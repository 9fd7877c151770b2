"""State that outlives a round stays right when a round goes wrong.

SCAFFOLD behind ``Guarded`` on quadratic clients f_i(w) = a_i/2 ||w - b_i||^2, through
the real message contents (c, the accepted map) and the real client half: the invariant
c = sum_i q_i c_i (q_i = n_i / n) must hold after a rejected reply, a lost (timed-out)
reply, a round skipped for too few valid replies and a rolled-back aggregate, with full
and partial participation and unequal num-examples; and the model must reach the
optimum of the objective FedAvg optimizes, sum_i (n_i / n) f_i.

Reference values (hand-derivable): the optimum of sum_i w_i a_i/2 ||x - b_i||^2 is
x* = sum_i w_i a_i b_i / sum_i w_i a_i.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import nn

import strategies
from strategies.guard import ExampleLimits
from strategies.sampling import PartitionSampler
from strategies.scaffold import (
    ACCEPTED_RECORD,
    C_RECORD,
    DC_PREFIX,
    STATE_CI,
    STATE_PENDING,
    Scaffold,
    ScaffoldClient,
)
from tests.helpers import make_grid, make_reply

NODE0 = 100  # node id of client 0; client i is node 100 + i


class Point(nn.Module):
    def __init__(self, w: np.ndarray):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))


class Federation:
    """Quadratic clients and a Guarded SCAFFOLD server, wired through real contents."""

    def __init__(self, a, b, n, *, fraction=1.0, weighting="num-examples", K=5, lr=0.05,
                 min_valid=1, seed=0):
        self.a, self.b, self.n = list(a), [np.asarray(v, float) for v in b], list(n)
        self.N, self.K, self.lr = len(self.a), K, lr
        self.nodes = [NODE0 + i for i in range(self.N)]
        self.scaffold = Scaffold(num_clients=self.N, server_lr=1.0, weighting=weighting,
                                 total_examples=sum(self.n), fraction_train=fraction,
                                 min_train_nodes=1, min_available_nodes=1)
        sampler = PartitionSampler(seed, lambda ids: {i: i - NODE0 for i in ids})
        self.guard = strategies.guarded("scaffold", self.scaffold, sampler=sampler,
                                        min_valid_replies=min_valid,
                             example_limits=ExampleLimits(default=10**6))
        self.states = [RecordDict() for _ in range(self.N)]
        self.x = np.zeros_like(self.b[0])
        self.weighting = weighting

    def client(self, i: int, content: RecordDict) -> tuple[np.ndarray, np.ndarray]:
        model = Point(self.x)
        config = content["config"]
        client = ScaffoldClient(model, content, self.states[i], str(config["run-tag"]), self.lr,
                                member_id=NODE0 + i, server_round=int(config["server-round"]))
        opt = torch.optim.SGD(model.parameters(), lr=self.lr)
        for _ in range(self.K):
            opt.zero_grad()
            (0.5 * self.a[i] * (model.w - torch.from_numpy(self.b[i])).pow(2).sum()).backward()
            client.hooks.after_backward(model)
            opt.step()
        dc = client.finish(model, self.K)[DC_PREFIX + "w"]
        return model.w.detach().numpy().copy(), dc

    def round(self, rnd: int, tamper=None) -> dict:
        """One round; ``tamper(i, reply_kwargs) -> reply_kwargs | None`` (None: lost)."""
        arrays = ArrayRecord({"w": Array(self.x.copy())})
        messages = self.guard.configure_train(rnd, arrays, ConfigRecord({"run-tag": "run"}),
                                              make_grid(self.nodes))
        replies = []
        for message in messages:
            i = message.metadata.dst_node_id - NODE0
            y, dc = self.client(i, message.content)
            kwargs = dict(arrays={"w": y, DC_PREFIX + "w": dc}, num_examples=self.n[i],
                          node_id=NODE0 + i)
            if tamper is not None:
                kwargs = tamper(i, kwargs)
            if kwargs is not None:
                replies.append(make_reply(**kwargs))
        new, metrics = self.guard.aggregate_train(rnd, replies)
        if new is not None:
            self.x = new["w"].numpy().copy()
        return dict(metrics)

    def effective_c_i(self, i: int) -> np.ndarray:
        """The c_i client i uses from now on: pending c_i+ if its round was aggregated."""
        state = self.states[i]
        if STATE_PENDING in state and self.scaffold.accepted.get(NODE0 + i) == \
                state["scaffold-meta"]["pending-round"]:
            return state[STATE_PENDING]["w"].numpy()
        return state[STATE_CI]["w"].numpy() if STATE_CI in state else np.zeros_like(self.x)

    def invariant_gap(self) -> float:
        q = (np.array(self.n, float) / sum(self.n) if self.weighting == "num-examples"
             else np.full(self.N, 1.0 / self.N))
        expected = sum(q[i] * self.effective_c_i(i) for i in range(self.N))
        return float(np.max(np.abs(self.scaffold.c["w"] - expected)))

    def optimum(self, weights) -> np.ndarray:
        w = np.asarray(weights, float) * np.asarray(self.a)
        return sum(w[i] * self.b[i] for i in range(self.N)) / w.sum()


def three_clients(**kwargs) -> Federation:
    rng = np.random.default_rng(3)
    return Federation([1.0, 2.0, 4.0], [rng.normal(size=2) for _ in range(3)], [100, 100, 100],
                      **kwargs)


def nan_reply(target):
    def tamper(i, kwargs):
        if i == target:
            kwargs["arrays"] = {k: np.full_like(v, np.nan) for k, v in kwargs["arrays"].items()}
        return kwargs
    return tamper


def lost_reply(target):
    return lambda i, kwargs: None if i == target else kwargs


FAULTS = {
    "rejected reply": (dict(), nan_reply(1)),
    "lost reply": (dict(), lost_reply(1)),
    "skipped round": (dict(min_valid=3), lost_reply(1)),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_invariant_and_optimum_survive_a_contribution_that_did_not_count(fault):
    """One reply of round 1 does not count; 300 rounds later c = sum q_i c_i to 1e-12 and x
    is at the optimum. (Before the commit protocol: c - mean c_i stuck near [0.3, 1.8].)"""
    kwargs, tamper = FAULTS[fault]
    fed = three_clients(**kwargs)
    metrics = fed.round(1, tamper)
    if fault == "skipped round":
        assert metrics["round-aggregated"] == 0 and not fed.scaffold.accepted
    else:
        assert metrics["round-aggregated"] == 1 and NODE0 + 1 not in fed.scaffold.accepted
    assert fed.invariant_gap() < 1e-12
    for rnd in range(2, 301):
        fed.round(rnd)
        assert fed.invariant_gap() < 1e-12
    np.testing.assert_allclose(fed.x, fed.optimum(fed.n), atol=1e-9)


def test_invariant_holds_under_partial_participation_with_faults_and_unequal_sizes():
    """10 clients of 1,000 / 100 / 10 ... examples, 30% sampled, a fault every few rounds
    (rejected, lost, whole round skipped): the invariant holds after every round and x
    reaches the sample-weighted optimum."""
    rng = np.random.default_rng(7)
    n = [1000, 100, 10, 500, 50, 5, 300, 30, 200, 20]
    fed = Federation(rng.uniform(0.5, 3.0, size=10), [rng.normal(size=3) for _ in range(10)], n,
                     fraction=0.3, min_valid=2, lr=0.05, K=5)
    faults = [None, nan_reply(3), lost_reply(0), None, lambda i, k: None]
    for rnd in range(1, 801):
        fed.round(rnd, faults[rnd % len(faults)])
        assert fed.invariant_gap() < 1e-12, rnd
    np.testing.assert_allclose(fed.x, fed.optimum(n), atol=1e-6)


@pytest.mark.parametrize("weighting, weights", [("num-examples", [1000, 100, 10]),
                                                ("uniform", [1, 1, 1])])
def test_fixed_point_is_the_optimum_of_the_chosen_objective(weighting, weights):
    """Clients of 1,000 / 100 / 10 examples, full participation: num-examples weighting
    converges to FedAvg's objective's optimum (300/1110 = 0.27), uniform to the paper's
    (12/3 = 4.0). Before the fix the default converged to the uniform one."""
    n = [1000, 100, 10]
    fed = Federation([1.0, 1.0, 1.0], [np.array([0.0]), np.array([2.0]), np.array([10.0])], n,
                     weighting=weighting)
    for rnd in range(1, 301):
        fed.round(rnd)
    other = fed.optimum([1, 1, 1] if weighting == "num-examples" else n)
    np.testing.assert_allclose(fed.x, fed.optimum(weights), atol=1e-9)
    assert np.abs(fed.x - other).max() > 1.0


def test_a_rolled_back_aggregate_commits_no_client_state():
    """A finite model but c = Inf (float32 overflow of c + increment) rolls the round back:
    x, c and the accepted map are as before, and the clients drop their pending c_i+."""
    x0 = np.zeros(2, np.float32)
    scaffold = Scaffold(num_clients=2, weighting="uniform", min_train_nodes=1, min_available_nodes=1)
    guard = strategies.guarded("scaffold", scaffold)
    guard.configure_train(1, ArrayRecord({"w": Array(x0)}), ConfigRecord(), make_grid([1, 2]))
    scaffold.c = {"w": np.full(2, 2e38, np.float32)}
    scaffold.accepted = {1: 0}
    replies = [make_reply({"w": np.ones(2, np.float32), DC_PREFIX + "w": np.full(2, 3e38, np.float32)},
                          node_id=node) for node in (1, 2)]
    new, metrics = guard.aggregate_train(1, replies)
    assert new is None and metrics["round-aggregated"] == 0
    np.testing.assert_array_equal(scaffold.c["w"], np.full(2, 2e38, np.float32))
    assert scaffold.accepted == {1: 0}


def test_a_client_never_stores_a_non_finite_control_variate():
    """A client whose local training diverges (Inf curvature) keeps its previous c_i, and
    its Delta c_i is non-finite, so the reply is rejected."""
    fed = three_clients()
    fed.round(1)
    fed.round(2)
    before = fed.effective_c_i(0).copy()
    fed.a[0] = float("inf")
    metrics = fed.round(3)
    assert metrics["replies-rejected"] == 1
    stored = [r for key, r in fed.states[0].items() if isinstance(r, ArrayRecord)]
    assert stored and all(np.all(np.isfinite(a.numpy())) for r in stored for a in r.values())
    fed.a[0] = 1.0
    np.testing.assert_array_equal(fed.effective_c_i(0), before)
    assert np.all(np.isfinite(fed.states[0][STATE_CI]["w"].numpy()))
    for rnd in range(4, 301):
        fed.round(rnd)
    assert fed.invariant_gap() < 1e-12
    np.testing.assert_allclose(fed.x, fed.optimum(fed.n), atol=1e-9)


def test_each_train_message_carries_its_own_clients_accepted_entry_only():
    """A client needs its own entry (did my round-r Delta c_i count?), not who else took
    part when: the whole map would grow every message with the clients ever trained."""
    fed = three_clients()
    fed.round(1)
    fed.scaffold.accepted.pop(fed.nodes[2])  # as if its reply had been left out
    messages = fed.guard.configure_train(2, ArrayRecord({"w": Array(fed.x)}),
                                         ConfigRecord({"run-tag": "run"}), make_grid(fed.nodes))
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(fed.nodes)
    for message in messages:
        node = message.metadata.dst_node_id
        expected = {} if node == fed.nodes[2] else {str(node): 1}
        assert dict(message.content[ACCEPTED_RECORD]) == expected
        assert C_RECORD in message.content


def test_a_rollback_under_the_attack_simulation_restores_the_scaffold_in_place():
    """AttackSimulation(Scaffold) (attack with scaffold is allowed): a rolled-back round
    must restore the Scaffold the guard attaches accepted entries from, not swap in a
    copy of it. Before the fix the guard's rollback replaced the wrapper's attributes by
    a deep copy, so the next round's messages came from the original Scaffold, whose
    accepted map already held the rolled-back round, and aggregation ran on the copy."""
    from strategies.attack_sim import AttackSimulation

    x0 = np.zeros(2, np.float32)
    scaffold = Scaffold(num_clients=2, weighting="uniform", min_train_nodes=1, min_available_nodes=1)
    wrapper = AttackSimulation(scaffold, attack="sign-flip", attackers=frozenset({1}),
                               partition_of=lambda node: node - 1)
    guard = strategies.guarded("scaffold", scaffold, inner=wrapper)
    guard.configure_train(1, ArrayRecord({"w": Array(x0)}), ConfigRecord(), make_grid([1, 2]))
    scaffold.c = {"w": np.full(2, 2e38, np.float32)}
    scaffold.accepted = {1: 0}
    replies = [make_reply({"w": np.ones(2, np.float32), DC_PREFIX + "w": np.full(2, 3e38, np.float32)},
                          node_id=node) for node in (1, 2)]
    new, metrics = guard.aggregate_train(1, replies)
    assert new is None and metrics["round-aggregated"] == 0
    assert wrapper.inner is scaffold  # the same object, restored in place
    assert scaffold.accepted == {1: 0}
    np.testing.assert_array_equal(scaffold.c["w"], np.full(2, 2e38, np.float32))
    messages = guard.configure_train(2, ArrayRecord({"w": Array(x0)}), ConfigRecord(), make_grid([1, 2]))
    entries = {m.metadata.dst_node_id: dict(m.content[ACCEPTED_RECORD]) for m in messages}
    assert entries == {1: {"1": 0}, 2: {}}
