"""DP-SGD in the client: accounting across rounds (against Opacus's accountant on the
composed history and against Google's dp-accounting), per-sample clipping, the noise's
standard deviation, post-processing hooks, target epsilon and the budget."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from opacus.accountants import RDPAccountant
from torch import nn

from fl_app import privacy
from fl_app.model import build_model
from fl_app.training import LocalHooks, train_local
from partitions import DataConfig, dataset_info, load_client_data
from strategies.scaffold import C_RECORD, STATE_PENDING, ScaffoldClient


@pytest.fixture(scope="module")
def digits():
    return load_client_data(DataConfig("digits", "iid", 0.5, 2, 2, 0.1, 0), 0, 2).train


def settings(sigma=1.0, clip=1.0, seed=0, sampler_seed=0):
    """Seeded DP settings: these tests compare exact values (the secure default is
    tested in tests/test_dp_randomness.py)."""
    return privacy.DPSettings(sigma, clip, 1e-5, randomness="seeded", noise_seed=seed,
                              sampler_seed=sampler_seed)


# ---------------------------------------------------------------- accounting
def test_spend_composes_over_rounds_through_the_node_state(digits):
    """Three rounds of 2 epochs, the accountant reloaded from Context.state each round:
    epsilon after round r equals Opacus's epsilon of the whole history (r * 2 * ceil(n/B)
    steps at q = 1/ceil(n/B)); a fresh accountant per round would report round 1's value
    every time."""
    state, n, batch = RecordDict(), len(digits), 32
    q, k = privacy.sample_rate(n, batch), privacy.steps_per_epoch(n, batch)
    model = build_model(dataset_info("digits"), seed=0)
    spent = []
    for rnd in (1, 2, 3):
        accountant = privacy.load_accountant(state, "run")
        train_local(model, digits, epochs=2, batch_size=batch, lr=0.05, seed=rnd,
                    dp=privacy.DPSGD(settings(1.1, seed=rnd), accountant))
        privacy.save_accountant(state, accountant, "run")
        spent.append(accountant.get_epsilon(1e-5))
        direct = RDPAccountant()
        direct.history = [(1.1, q, rnd * 2 * k)]
        assert spent[-1] == pytest.approx(direct.get_epsilon(1e-5), rel=1e-12)
    assert spent[0] < spent[1] < spent[2]
    assert privacy.load_accountant(state, "another-run").history == []  # a new run starts at 0


@pytest.mark.parametrize("sigma, q, steps", [(1.1, 0.05, 600), (0.8, 0.01, 3000), (2.0, 0.1, 50)])
def test_opacus_epsilon_matches_google_dp_accounting(sigma, q, steps):
    """Independent check: dp-accounting's RDP accountant for the same Poisson-subsampled
    Gaussian mechanism at the same orders agrees to 0.5% (the two convert RDP to (eps,
    delta) slightly differently: 7.6069 against 7.6116 for the first case)."""
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    theirs = dp_accounting.rdp.RdpAccountant(orders=accountant.DEFAULT_ALPHAS)
    theirs.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    assert accountant.get_epsilon(1e-5) == pytest.approx(theirs.get_epsilon(1e-5), rel=5e-3)


def test_epsilon_after_adds_the_next_round_without_changing_the_history():
    accountant = RDPAccountant()
    accountant.history = [(1.0, 0.05, 100)]
    ahead = privacy.epsilon_after(accountant, 1e-5, noise_multiplier=1.0, rate=0.05, steps=100)
    direct = RDPAccountant()
    direct.history = [(1.0, 0.05, 200)]
    assert ahead == pytest.approx(direct.get_epsilon(1e-5))
    assert accountant.history == [(1.0, 0.05, 100)]
    assert privacy.epsilon_after(RDPAccountant(), 1e-5) == 0.0


def test_target_epsilon_is_met_after_the_planned_rounds(make_config, digits):
    """dp-target-epsilon 2 over 4 rounds of 1 epoch: the sigma Opacus picks spends within
    its tolerance (0.01) of 2, and not more."""
    cfg = make_config(dp=True, **{"dp-target-epsilon": 2.0, "num-server-rounds": 4})
    n = len(digits)
    sigma = privacy.round_noise(cfg, n)
    accountant = RDPAccountant()
    accountant.history = [(sigma, privacy.sample_rate(n, 32), 4 * privacy.steps_per_epoch(n, 32))]
    assert 1.99 <= accountant.get_epsilon(1e-5) <= 2.0


# ---------------------------------------------------------------- mechanism
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_per_sample_gradients_are_clipped_to_the_norm():
    """sigma = 0 (no noise) and C = 0.5: the step's gradient is sum_i clip(g_i) / (q n), each
    g_i computed by hand per sample and scaled to norm <= C; every clipped norm <= C."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 4) * 5, torch.randint(0, 3, (8,))
    model = Tiny()
    per_sample = []
    for i in range(8):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        per_sample.append(g * min(1.0, 0.5 / (float(g.norm()) + 1e-6)))
    assert all(float(g.norm()) <= 0.5 + 1e-6 for g in per_sample)
    captured = {}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    private = privacy.PrivateTraining(model, opt, settings(sigma=0.0, clip=0.5), num_examples=8,
                                      batch_size=8, accountant=RDPAccountant())
    private.zero_grad()
    nn.functional.cross_entropy(private.module(x), y).backward()
    private.step(lambda m: captured.update(
        g=torch.cat([p.grad.flatten().clone() for p in m.parameters()])))
    private.close()
    expected = torch.stack(per_sample).sum(0) / (private.rate * 8)
    torch.testing.assert_close(captured["g"], expected, rtol=1e-5, atol=1e-6)


def test_noise_has_standard_deviation_sigma_times_clip():
    """An empty Poisson batch leaves pure noise: q n * grad ~ N(0, (sigma C)^2) per
    coordinate. 199k coordinates of the MLP: the sample std is within 1% of sigma C = 6."""
    model = build_model(dataset_info("digits"), seed=0, kind="mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    private = privacy.PrivateTraining(model, opt, settings(sigma=2.0, clip=3.0, seed=5),
                                      num_examples=100, batch_size=10, accountant=RDPAccountant())
    private.zero_grad()
    captured = {}
    private.empty_step(lambda m: captured.update(  # the app's step of an empty batch
        g=torch.cat([p.grad.flatten().clone() for p in m.parameters()])))
    private.close()
    noise = captured["g"] * (private.rate * 100)
    assert noise.numel() > 10_000
    assert float(noise.std()) == pytest.approx(6.0, rel=0.01)
    assert abs(float(noise.mean())) < 0.05


def test_the_plain_model_comes_back(digits):
    """After DP training the model has its own keys (no `_module.`) and no Opacus hooks."""
    model = build_model(dataset_info("digits"), seed=0)
    keys = list(model.state_dict())
    train_local(model, digits, epochs=1, batch_size=32, lr=0.05,
                dp=privacy.DPSGD(settings(), RDPAccountant()))
    assert list(model.state_dict()) == keys
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_batchnorm_is_refused_with_opacus_reason():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 10))
    with pytest.raises(ValueError, match="cannot be trained with DP-SGD.*BatchNorm"):
        privacy.check_model(model)


def test_a_loss_penalty_is_refused_under_dp(digits):
    model = build_model(dataset_info("digits"), seed=0)
    with pytest.raises(ValueError, match="clipped and noised"):
        train_local(model, digits, epochs=1, batch_size=32, lr=0.05,
                    dp=privacy.DPSGD(settings(), RDPAccountant()),
                    hooks=LocalHooks(penalty=lambda m: sum(p.sum() for p in m.parameters())))


def test_scaffold_control_variate_comes_from_the_privatized_gradients(digits):
    """Under DP, c_i+ is the mean of the gradients the optimizer applied (clipped and noised).
    With plain SGD and c = c_i = 0 that mean is exactly the displacement (x - y)/(K lr),
    whatever the gradients were; a c_i+ summed from raw gradients (or hooks run before
    Opacus's step) would miss it by the noise, sigma C / (q n) per coordinate and step."""
    model = build_model(dataset_info("digits"), seed=0)
    x = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in x.items()}),
                          "config": ConfigRecord({"run-tag": "t"}),
                          C_RECORD: ArrayRecord({k: Array(np.zeros_like(v)) for k, v in x.items()})})
    state = RecordDict()
    client = ScaffoldClient(model, content, state, "t", 0.05, member_id=1, server_round=1)
    result = train_local(model, digits, epochs=1, batch_size=32, lr=0.05, seed=3,
                         dp=privacy.DPSGD(settings(sigma=1.0, clip=0.1, seed=9), RDPAccountant()),
                         hooks=client.hooks)
    client.finish(model, result.steps)
    pending = {k: a.numpy() for k, a in state[STATE_PENDING].items()}
    y = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for key, _ in model.named_parameters():
        displacement = (x[key].astype(np.float64) - y[key]) / (result.steps * 0.05)
        np.testing.assert_allclose(pending[key], displacement, rtol=1e-3, atol=1e-4)


def test_budget_and_bad_dp_inputs_fail_before_training(make_config):
    model = build_model(dataset_info("digits"), seed=0)
    with pytest.raises(ValueError, match="'dp-delta' = 0.01 must be below 1/n"):
        privacy.check_run(make_config(dp=True, **{"dp-delta": 0.01}), [100, 500], model)
    with pytest.raises(ValueError, match="'dp-target-epsilon' = 1e-06 cannot be reached"):
        privacy.check_run(make_config(dp=True, **{"dp-target-epsilon": 1e-6}), [100], model)
    privacy.check_run(make_config(dp=True), [100, 500], model)


@pytest.mark.parametrize("overrides, message", [
    ({"dp-noise-multiplier": 2.0}, "only take effect with dp = true"),
    ({"dp": True, "dp-noise-multiplier": -1.0}, "'dp-noise-multiplier' (sigma) must be a number >= 0"),
    ({"dp": True, "dp-max-grad-norm": 0.0}, "'dp-max-grad-norm' must be a number > 0"),
    ({"dp": True, "dp-delta": 1.0}, "'dp-delta' must be a number in (0, 1)"),
    ({"dp": True, "dp-noise-multiplier": 0.0}, "adds no noise"),
    ({"dp": True, "dp-max-epsilon": -1.0}, "'dp-max-epsilon' must be a number > 0, or 0"),
    ({"dp": "yes"}, "'dp' must be true or false"),
])
def test_bad_dp_config_is_refused(make_config, overrides, message):
    with pytest.raises(ValueError) as err:
        make_config(**overrides)
    assert message in str(err.value)


def test_dp_defaults_in_code_match_pyproject(defaults):
    from fl_app.config import DP_DEFAULTS

    for name, value in DP_DEFAULTS.items():
        assert defaults[name.replace("_", "-")] == value, name


def client_message(cfg, server_round):
    from flwr.app import Message

    from fl_common import wire

    model = build_model(dataset_info(cfg.dataset), seed=0)
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "config": ConfigRecord({wire.RUN_CONFIG: cfg.to_json(), wire.RUN_TAG: "run",
                                wire.SERVER_ROUND: server_round}),
    })
    return Message(content, dst_node_id=5, message_type="train")


def test_budget_stops_a_client_exactly_when_its_next_round_would_exceed_it(make_config):
    """Two rounds would spend e1 < e2; with dp-max-epsilon between them the client trains
    in round 1 (and reports e1), then refuses round 2 with a dp-out-of-budget error."""
    from flwr.app import Context

    from fl_app import client_app
    from fl_common import wire

    cfg = make_config(dp=True, **{"num-server-rounds": 2})
    n = len(load_client_data(cfg.data, 0, 2).train)
    q, k = privacy.sample_rate(n, cfg.batch_size), privacy.steps_per_epoch(n, cfg.batch_size)
    e1, e2 = (privacy.epsilon_after(RDPAccountant(), 1e-5, noise_multiplier=1.0, rate=q, steps=r * k)
              for r in (1, 2))
    cfg = cfg.replace(**{"dp-max-epsilon": (e1 + e2) / 2})
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    first = client_app.train(client_message(cfg, 1), context)
    assert not first.has_error()
    metrics = first.content["metrics"]
    assert metrics[wire.DP_EPSILON] == pytest.approx(e1) and metrics[wire.DP_NOISE] == 1.0
    second = client_app.train(client_message(cfg, 2), context)
    assert second.has_error() and second.error.reason.startswith(wire.DP_OUT_OF_BUDGET)
    # the refused round spent nothing
    assert privacy.load_accountant(context.state, "run").history == [(1.0, q, k)]


def test_server_records_max_and_mean_epsilon_and_clients_out_of_budget():
    from flwr.serverapp.strategy import FedAvg

    from strategies.guard import Guarded
    from tests.helpers import make_grid, make_reply

    guard = Guarded(FedAvg(min_train_nodes=1, min_available_nodes=1))
    guard.configure_train(1, ArrayRecord({"w": Array(np.zeros(2, np.float32))}), ConfigRecord(),
                          make_grid([1, 2, 3]))
    replies = [make_reply({"w": np.ones(2, np.float32)}, node_id=i, extra_metrics={"dp-epsilon": e})
               for i, e in ((1, 1.5), (2, 2.5))]
    replies.append(make_reply(None, node_id=3, error="dp-out-of-budget: epsilon 3.0 spent"))
    _, metrics = guard.aggregate_train(1, replies)
    assert metrics["dp-epsilon-max"] == 2.5 and metrics["dp-epsilon-mean"] == 2.0
    assert metrics["dp-out-of-budget"] == 1


def test_a_dp_reply_carries_no_unprivatized_training_metrics(make_config):
    from flwr.app import Context

    from fl_app import client_app
    from fl_common import wire

    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    reply = client_app.train(client_message(make_config(dp=True), 1), context)
    metrics = reply.content["metrics"]
    assert wire.TRAIN_LOSS not in metrics and wire.TRAIN_ACCURACY not in metrics
    assert wire.DP_EPSILON in metrics
    plain = client_app.train(client_message(make_config(), 1), context)
    assert wire.TRAIN_LOSS in plain.content["metrics"]


def test_the_spend_survives_a_supernode_restart_with_a_state_dir(make_config, tmp_path):
    """Round 1 on a node with state-dir; the SuperNode restarts (new node id, empty
    Context.state); round 2 starts from the saved history: two rounds' spend, not one."""
    from flwr.app import Context

    from fl_app import client_app
    from fl_common import wire

    cfg = make_config(dp=True, **{"num-server-rounds": 2})
    node_config = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path)}
    first = client_app.train(client_message(cfg, 1),
                             Context(run_id=1, node_id=5, node_config=node_config,
                                     state=RecordDict(), run_config={}))
    restarted = Context(run_id=1, node_id=77, node_config=node_config, state=RecordDict(),
                        run_config={})
    second = client_app.train(client_message(cfg, 2), restarted)
    e1, e2 = (m.content["metrics"][wire.DP_EPSILON] for m in (first, second))
    n = len(load_client_data(cfg.data, 0, 2).train)
    q, k = privacy.sample_rate(n, cfg.batch_size), privacy.steps_per_epoch(n, cfg.batch_size)
    two = privacy.epsilon_after(RDPAccountant(), 1e-5, noise_multiplier=1.0, rate=q, steps=2 * k)
    assert e2 == pytest.approx(two) and e2 > e1
    # without the state dir the restarted node would have started over
    forgetful = client_app.train(client_message(cfg, 2), Context(
        run_id=1, node_id=78, node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(), run_config={}))
    assert forgetful.content["metrics"][wire.DP_EPSILON] == pytest.approx(e1)


def test_a_corrupt_state_file_stops_the_client_instead_of_under_counting(tmp_path):
    path = privacy.accountant_file(str(tmp_path), "run", 0)
    path.write_text('{"run-tag": "run", "history": [[1.0, 0.1')  # a torn write
    with pytest.raises(ValueError, match="refusing to train without it"):
        privacy.load_accountant(RecordDict(), "run", path=path)


def test_the_longer_history_wins_and_the_file_is_replaced_atomically(tmp_path):
    path = privacy.accountant_file(str(tmp_path), "run/1", 3)
    assert path.name == "dp-accountant-run_1-p3.json"
    long, short = RDPAccountant(), RDPAccountant()
    long.history, short.history = [(1.0, 0.1, 30)], [(1.0, 0.1, 10)]
    privacy.save_accountant(RecordDict(), long, "run/1", path=path)
    state = RecordDict()
    privacy.save_accountant(state, short, "run/1")
    assert privacy.load_accountant(state, "run/1", path=path).history == [(1.0, 0.1, 30)]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_fedprox_term_acts_after_privatization():
    """sigma = 0, C huge (no clipping), one step over all 8 samples (q = 1): Opacus's
    gradient is the batch mean g; FedProx then adds mu (w - w^t). With w^t = w - 1 (a
    moved model) the SGD step is w - lr (g + mu): the term survives Opacus's step."""
    from strategies.fedprox import client_hooks

    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    model = Tiny()
    hooks = client_hooks(model, mu=0.5)  # w^t = the current weights...
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # ... and the model has moved by +1 from w^t
    w = [p.detach().clone() for p in model.parameters()]
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    g = [p.grad.clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    private = privacy.PrivateTraining(model, opt, settings(sigma=0.0, clip=1e6), num_examples=8,
                                      batch_size=8, accountant=RDPAccountant())
    private.zero_grad()
    nn.functional.cross_entropy(private.module(x), y).backward()
    private.step(hooks.after_backward)
    private.close()
    for p, w0, g0 in zip(model.parameters(), w, g):
        torch.testing.assert_close(p.detach(), w0 - 0.1 * (g0 + 0.5), rtol=1e-5, atol=1e-6)
