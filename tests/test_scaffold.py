"""SCAFFOLD (Option II): pure updates by hand, the full algorithm on quadratics against a
NumPy reference with partial participation, and the client half on the real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fl_app.model import build_model
from fl_app.training import LocalHooks, train_local
from partitions import DataConfig, dataset_info, load_client_data
import strategies
from strategies.scaffold import (
    ACCEPTED_RECORD,
    C_RECORD,
    CONTROL_VARIATE,
    DC_PREFIX,
    STATE_CI,
    STATE_PENDING,
    VARIATES,
    Scaffold,
    ScaffoldClient,
    aggregation_weights,
    control_variate_update,
    gradient_mean_update,
    server_update,
)
from tests.helpers import make_grid, make_reply


def test_option_ii_control_variate_by_hand():
    """c_i = .5, c = 1, x = 2, y = 1, K = 2, eta_l = .25: Delta c = -1 + (2-1)/(2*.25) = 1,
    c_i+ = .5 + 1 = 1.5."""
    new_c_i, delta_c = control_variate_update(
        {"w": np.array([0.5])}, {"w": np.array([1.0])}, {"w": np.array([2.0])},
        {"w": np.array([1.0])}, num_steps=2, lr=0.25)
    assert delta_c["w"][0] == pytest.approx(1.0) and new_c_i["w"][0] == pytest.approx(1.5)


def test_server_update_by_hand():
    """x = (1, 1), c = (0, 0), mean dy = (.5, -1), c increment = (1, 2), eta_g = .5:
    x' = (1.25, .5), c' = (1, 2)."""
    x, c = server_update({"w": np.array([1.0, 1.0])}, {"w": np.zeros(2)},
                         {"w": np.array([0.5, -1.0])}, {"w": np.array([1.0, 2.0])}, server_lr=0.5)
    np.testing.assert_allclose(x["w"], [1.25, 0.5])
    np.testing.assert_allclose(c["w"], [1.0, 2.0])


def test_aggregation_weights_by_hand():
    """n_S = (30, 10), n = 200, N = 8: num-examples p = (.75, .25), q = (.15, .05);
    uniform p = (.5, .5), q = (1/8, 1/8)."""
    p, q = aggregation_weights([30, 10], weighting="num-examples", num_clients=8, total_examples=200)
    np.testing.assert_allclose(p, [0.75, 0.25])
    np.testing.assert_allclose(q, [0.15, 0.05])
    p, q = aggregation_weights([30, 10], weighting="uniform", num_clients=8, total_examples=None)
    np.testing.assert_allclose(p, [0.5, 0.5])
    np.testing.assert_allclose(q, [0.125, 0.125])
    with pytest.raises(ValueError, match="needs n"):
        aggregation_weights([30, 10], weighting="num-examples", num_clients=8, total_examples=39)


def test_gradient_mean_update_by_hand():
    """Raw gradients summed over K = 4 steps = (8, -4): c_i+ = (2, -1); c_i = (1, 1): dc = (1, -2)."""
    new_c_i, dc = gradient_mean_update({"w": np.array([1.0, 1.0])}, {"w": np.array([8.0, -4.0])}, 4)
    np.testing.assert_allclose(new_c_i["w"], [2.0, -1.0])
    np.testing.assert_allclose(dc["w"], [1.0, -2.0])


# ---------------------------------------------------------------- quadratic clients
class Point(nn.Module):
    def __init__(self, w: np.ndarray):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))


def client_round(x, c_record, state, a, b, K, lr, tag="run", variate="gradient-mean", momentum=0.0,
                 node_id=1, server_round=1, accepted=None):
    """One SCAFFOLD client on f(w) = a/2 ||w - b||^2 with SGD: (y, Delta c).

    ``accepted`` is the server's map node id -> last aggregated round; by default it says
    that this node's previous contribution was aggregated (so c_i+ of the last round is
    committed before this one)."""
    model = Point(x)
    if accepted is None:
        accepted = {str(node_id): server_round - 1}
    content = RecordDict({"arrays": ArrayRecord({"w": Array(x)}), C_RECORD: c_record,
                          ACCEPTED_RECORD: ConfigRecord(accepted),
                          "config": ConfigRecord({"run-tag": tag, CONTROL_VARIATE: variate,
                                                  "server-round": server_round})})
    client = ScaffoldClient(model, content, state, tag, lr, member_id=node_id,
                            server_round=server_round)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for _ in range(K):
        opt.zero_grad()
        (0.5 * a * (model.w - torch.from_numpy(b)).pow(2).sum()).backward()
        client.hooks.after_backward(model)
        opt.step()
    extra = client.finish(model, K)
    return model.w.detach().numpy().copy(), extra[DC_PREFIX + "w"]


def reference_round(x, c, c_i, a, b, K, lr):
    """Algorithm 1 by the book: corrected SGD, then Option II's displacement formula."""
    y = x.copy()
    for _ in range(K):
        y = y - lr * (a * (y - b) - c_i + c)
    new_c_i = c_i - c + (x - y) / (K * lr)
    return y, new_c_i - c_i, new_c_i


@pytest.mark.parametrize("variate", VARIATES)
def test_client_matches_closed_form_and_option_ii_formula(variate):
    """With plain SGD both ways of computing c_i+ are Option II's formula."""
    x, c, a, b = np.array([1.0, -2.0]), np.array([0.3, -0.1]), 2.0, np.array([0.5, 0.5])
    state = RecordDict()
    state[STATE_CI] = ArrayRecord({"w": Array(np.array([0.2, 0.4]))})
    state["scaffold-meta"] = ConfigRecord({"run-tag": "run"})
    y, dc = client_round(x, ArrayRecord({"w": Array(c)}), state, a, b, K=5, lr=0.1, variate=variate)
    y_ref, dc_ref, c_i_ref = reference_round(x, c, np.array([0.2, 0.4]), a, b, 5, 0.1)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12)
    np.testing.assert_allclose(dc, dc_ref, rtol=1e-10)  # gradient mean == displacement formula
    np.testing.assert_allclose(state[STATE_PENDING]["w"].numpy(), c_i_ref, rtol=1e-10)
    np.testing.assert_array_equal(state[STATE_CI]["w"].numpy(), [0.2, 0.4])  # not yet committed
    # ... and the paper's pure formula agrees
    _, dc_formula = control_variate_update({"w": np.array([0.2, 0.4])}, {"w": c}, {"w": x},
                                           {"w": y}, 5, 0.1)
    np.testing.assert_allclose(dc, dc_formula["w"], rtol=1e-10)


def test_with_momentum_gradient_mean_is_the_mean_raw_gradient_and_displacement_is_not():
    """Momentum .9, K = 20: c_i+ (gradient-mean) = mean of a(y_k - b) over the visited y_k;
    the displacement formula is then far larger (it counts momentum's extra distance)."""
    x, a, b, K, lr = np.array([3.0]), 1.0, np.array([0.0]), 20, 0.01
    zero_c = ArrayRecord({"w": Array(np.zeros(1))})
    states = {v: RecordDict() for v in VARIATES}
    for variate in VARIATES:
        client_round(x, zero_c, states[variate], a, b, K, lr, variate=variate, momentum=0.9)
    # reference: heavy-ball iterates and their raw gradients
    y, buf, grads = x.copy(), np.zeros(1), []
    for _ in range(K):
        g = a * (y - b)
        grads.append(g)
        buf = 0.9 * buf + g
        y = y - lr * buf
    mean_grad = np.mean(grads, axis=0)
    np.testing.assert_allclose(states["gradient-mean"][STATE_PENDING]["w"].numpy(), mean_grad, rtol=1e-10)
    np.testing.assert_allclose(states["displacement"][STATE_PENDING]["w"].numpy(), (x - y) / (K * lr), rtol=1e-10)
    assert states["displacement"][STATE_PENDING]["w"].numpy()[0] > 3 * mean_grad[0]


def committed_or_pending(state, node_id, accepted):
    """The c_i client ``node_id`` will use from now on: its pending c_i+ if the server's
    ``accepted`` map (node id -> round) says it was aggregated, else its committed c_i."""
    if STATE_PENDING in state and accepted.get(node_id) == state["scaffold-meta"]["pending-round"]:
        return state[STATE_PENDING]["w"].numpy()
    return state[STATE_CI]["w"].numpy() if STATE_CI in state else None


def test_full_algorithm_with_partial_participation_matches_reference():
    """N = 3 quadratic clients, uniform weighting (the paper's), rounds sample {0, 1},
    {1, 2}, {0, 2}: server x and c and every client's c_i follow Algorithm 1; unsampled
    clients keep c_i; c = mean_i c_i throughout."""
    rng = np.random.default_rng(1)
    N, K, lr, eta_g = 3, 4, 0.05, 0.7
    a = [1.0, 2.0, 4.0]
    b = [rng.normal(size=3) for _ in range(N)]
    strategy = Scaffold(num_clients=N, server_lr=eta_g, weighting="uniform",
                        min_train_nodes=1, min_available_nodes=1)
    states = [RecordDict() for _ in range(N)]
    x = np.zeros(3)
    ref_x, ref_c, ref_ci = np.zeros(3), np.zeros(3), [np.zeros(3) for _ in range(N)]
    for rnd, sampled in enumerate(([0, 1], [1, 2], [0, 2], [0, 1]), start=1):
        messages = list(strategy.configure_train(
            rnd, ArrayRecord({"w": Array(x)}), ConfigRecord(), make_grid([10, 11, 12])))
        by_node = {m.metadata.dst_node_id: m.content for m in messages}
        replies, dys, dcs = [], [], []
        for i in sampled:
            content = by_node[10 + i]  # its own message: c and its own accepted entry
            y, dc = client_round(x, content[C_RECORD], states[i], a[i], b[i], K, lr, node_id=10 + i,
                                 server_round=rnd, accepted=dict(content[ACCEPTED_RECORD]))
            replies.append(make_reply({"w": y, DC_PREFIX + "w": dc}, num_examples=5, node_id=10 + i))
            y_ref, dc_ref, ref_ci[i] = reference_round(ref_x, ref_c, ref_ci[i], a[i], b[i], K, lr)
            dys.append(y_ref - ref_x)
            dcs.append(dc_ref)
        new, _ = strategy.aggregate_train(rnd, replies)
        x = new["w"].numpy()
        ref_x = ref_x + eta_g * np.mean(dys, axis=0)
        ref_c = ref_c + len(sampled) / N * np.mean(dcs, axis=0)
        np.testing.assert_allclose(x, ref_x, rtol=1e-9)
        np.testing.assert_allclose(strategy.c["w"], ref_c, rtol=1e-9)
        all_ci = []
        for i in range(N):
            c_i = committed_or_pending(states[i], 10 + i, strategy.accepted)
            if c_i is None:
                assert not ref_ci[i].any()
                c_i = np.zeros(3)
            np.testing.assert_allclose(c_i, ref_ci[i], rtol=1e-9, atol=1e-15)
            all_ci.append(c_i)
        np.testing.assert_allclose(strategy.c["w"], np.mean(all_ci, axis=0), rtol=1e-9, atol=1e-12)


def test_zero_control_variates_and_unit_server_lr_is_fedavg():
    x = ArrayRecord({"w": Array(np.array([1.0, 1.0], dtype=np.float32))})
    strategy = Scaffold(num_clients=4, server_lr=1.0, total_examples=10, min_train_nodes=1,
                        min_available_nodes=1)
    strategy.configure_train(1, x, ConfigRecord(), make_grid([1, 2]))
    ys = [np.array([0, 3], np.float32), np.array([3, 0], np.float32)]
    zeros = np.zeros(2, np.float32)
    replies = [make_reply({"w": y, DC_PREFIX + "w": zeros}, num_examples=n, node_id=i)
               for i, (y, n) in enumerate(zip(ys, (1, 2)))]
    got, _ = strategy.aggregate_train(1, replies)
    ref, _ = FedAvg(min_train_nodes=1, min_available_nodes=1).aggregate_train(
        1, [make_reply({"w": y}, num_examples=n) for y, n in zip(ys, (1, 2))])
    np.testing.assert_allclose(got["w"].numpy(), ref["w"].numpy(), rtol=1e-6)


def test_gradient_correction_equals_a_linear_penalty_on_the_real_model():
    """Adding v = c - c_i to every gradient is gradient descent on loss + <v, w>."""
    data = load_client_data(DataConfig("digits", "iid", 0.5, 2, 2, 0.2, 0), 0, 3).train
    info = dataset_info("digits")
    torch.manual_seed(0)
    v = {k: 0.05 * torch.randn_like(p) for k, p in build_model(info, seed=0).named_parameters()}

    def scaffold_model():
        model = build_model(info, seed=0)
        x = {k: Array(t.numpy()) for k, t in model.state_dict().items()}
        content = RecordDict({"arrays": ArrayRecord(x), "config": ConfigRecord({"run-tag": "t"}),
                              C_RECORD: ArrayRecord({k: Array(v[k].numpy()) for k in x})})
        client = ScaffoldClient(model, content, RecordDict(), "t", 0.05, member_id=1,
                                server_round=1)  # c_i = 0: correction = v
        train_local(model, data, epochs=1, batch_size=32, lr=0.05, seed=1, hooks=client.hooks)
        return model

    def penalty_model():
        model = build_model(info, seed=0)
        penalty = lambda m: sum((v[k] * p).sum() for k, p in m.named_parameters())  # noqa: E731
        train_local(model, data, epochs=1, batch_size=32, lr=0.05, seed=1,
                    hooks=LocalHooks(penalty=penalty))
        return model

    a, b = scaffold_model().state_dict(), penalty_model().state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_client_state_persists_within_a_run_and_resets_for_another():
    x = np.array([1.0, 1.0])
    c = ArrayRecord({"w": Array(np.zeros(2))})
    state = RecordDict()
    client_round(x, c, state, 1.0, np.zeros(2), K=3, lr=0.1, tag="run-a", server_round=1)
    stored = state[STATE_PENDING]["w"].numpy().copy()
    assert np.abs(stored).sum() > 0
    # same run, round 1 aggregated: starts from the committed c_i+
    client = ScaffoldClient(Point(x), _content(x, c, "run-a", {"1": 1}), state, "run-a", 0.1,
                            member_id=1, server_round=2)
    assert np.array_equal(client.c_i["w"], stored)
    # another run in the same process (a sweep): starts from zero
    client = ScaffoldClient(Point(x), _content(x, c, "run-b", {"1": 1}), state, "run-b", 0.1,
                            member_id=1, server_round=2)
    assert not client.c_i["w"].any() and STATE_CI not in state


def _content(x, c, tag, accepted=None):
    return RecordDict({"arrays": ArrayRecord({"w": Array(x)}), ACCEPTED_RECORD: ConfigRecord(accepted or {}),
                       "config": ConfigRecord({"run-tag": tag}), C_RECORD: c})


def test_client_without_server_control_variate_fails_clearly():
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(2))}),
                          "config": ConfigRecord({"run-tag": "t"})})
    with pytest.raises(ValueError, match="carries no 'scaffold-c' record"):
        ScaffoldClient(Point(np.zeros(2)), content, RecordDict(), "t", 0.1, member_id=1, server_round=1)


def test_reply_without_delta_c_is_rejected_and_upload_is_doubled():
    x = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    strategy = strategies.guarded("scaffold", Scaffold(num_clients=2, total_examples=20,
                                                       min_train_nodes=1, min_available_nodes=1))
    messages = list(strategy.configure_train(1, x, ConfigRecord(), make_grid([1, 2])))
    assert C_RECORD in messages[0].content
    good = make_reply({"w": np.ones(4, np.float32), DC_PREFIX + "w": np.ones(4, np.float32)}, node_id=1)
    no_dc = make_reply({"w": np.ones(4, np.float32)}, node_id=2)
    new, metrics = strategy.aggregate_train(1, [good, no_dc])
    assert metrics["replies-rejected"] == 1 and metrics["replies-valid"] == 1
    np.testing.assert_allclose(new["w"].numpy(), np.ones(4))
    model_bytes = sum(len(a.data) for a in x.values())
    assert metrics["upload-bytes-per-client"] == 2 * model_bytes
    assert metrics["download-bytes-per-client"] == 2 * model_bytes  # x and c go down


def test_server_state_round_trips():
    strategy = Scaffold(num_clients=2, total_examples=10, min_train_nodes=1, min_available_nodes=1)
    strategy.c = {"w": np.array([1.0, 2.0])}
    strategy.accepted = {7: 3}
    other = Scaffold(num_clients=2, total_examples=10)
    other.load_state_dict(strategy.state_dict())
    np.testing.assert_array_equal(other.c["w"], [1.0, 2.0])
    assert other.accepted == {7: 3}


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_clients=0), "num_clients"), (dict(num_clients=2, server_lr=0.0), "server_lr"),
    (dict(num_clients=2, control_variate="option-i"), "control_variate"),
    (dict(num_clients=2, weighting="median"), "weighting"),
    (dict(num_clients=2), "needs total_examples"),
])
def test_bad_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Scaffold(**kwargs)


def test_a_client_half_is_freed_without_the_cyclic_collector():
    """A simulation worker runs thousands of client messages: the client half (its c,
    c_i, correction and gradient-sum tensors) must be freed by reference counting as soon
    as the message is done. A hook bound to the client (a reference cycle) kept ~0.6 MB a
    message alive until Python's cyclic collector ran."""
    import gc
    import weakref

    x = np.array([1.0, -2.0])
    model = Point(x)
    content = _content(x, ArrayRecord({"w": Array(np.zeros(2))}), "run")
    client = ScaffoldClient(model, content, RecordDict(), "run", 0.1, member_id=0, server_round=1)
    model.w.grad = torch.ones(2, dtype=torch.float64)
    client.hooks.after_backward(model)
    client.finish(model, 1)
    gone = weakref.ref(client)
    gc.disable()
    try:
        del client
        assert gone() is None, "the SCAFFOLD client half is held by a reference cycle"
    finally:
        gc.enable()
