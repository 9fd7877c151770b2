"""The client owns its privacy: a node's own policy, its accountant across runs, and no
private statistics in plaintext under DP (fl_app/privacy_policy.py, fl_app/client_app.py,
fl_app/privacy.py)."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from opacus.accountants import RDPAccountant

from fl_app import client_app, privacy
from fl_common import wire
from fl_app.model import build_model
from fl_app.privacy_policy import NodePolicy
from partitions import dataset_info, load_client_data


def _message(cfg, server_round=1, run_tag="run", extra=None) -> Message:
    model = build_model(dataset_info(cfg.dataset), seed=0)
    config = {wire.RUN_CONFIG: cfg.to_json(), wire.RUN_TAG: run_tag, wire.SERVER_ROUND: server_round,
              **(extra or {})}
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                               "config": ConfigRecord(config)}), dst_node_id=5, message_type="train")


def _context(**node_config) -> Context:
    return Context(run_id=1, node_id=5, state=RecordDict(), run_config={},
                   node_config={"partition-id": 0, "num-partitions": 2, **node_config})


def _steps(cfg):
    n = len(load_client_data(cfg.data, 0, 2).train)
    return privacy.sample_rate(n, cfg.batch_size), privacy.steps_per_epoch(n, cfg.batch_size)


# ---------------------------------------------------------------- the node's policy
@pytest.mark.parametrize("run, node, fragment", [
    ({}, {"dp-required": True}, "asks for DP-SGD; the run has dp = false"),
    ({"dp": True, "dp-mode": "user"}, {"dp-required": True}, "accepts only dp-mode \"sample\""),
    ({"dp": True, "dp-randomness": "seeded"}, {"dp-required": True}, "accepts only \"secure\""),
    ({"dp": True, "dp-noise-multiplier": 0.5}, {"dp-min-noise-multiplier": 0.8},
     "noise multiplier 0.5 is below node config 'dp-min-noise-multiplier' = 0.8"),
    ({"dp": True}, {"dp-required": "maybe"}, "Node config 'dp-required' must be true or false"),
    ({"dp": True}, {"dp-delta": 2.0}, "Node config 'dp-delta' must be a number in (0, 1)"),
])
def test_a_node_policy_refuses_what_breaks_it_before_training(make_config, run, node, fragment):
    reply = client_app.train(_message(make_config(**run)), _context(**node))
    assert reply.has_error() and reply.error.code == wire.DP_POLICY_ERROR_CODE
    assert reply.error.reason.startswith(wire.DP_POLICY_REFUSED) and fragment in reply.error.reason


def test_a_node_policy_caps_its_own_total_spend(make_config, tmp_path):
    """Round 1 spends e1; with the node's cap between e1 and e2 (two rounds' spend) the
    node refuses round 2 whatever the run config says (no dp-max-epsilon in it)."""
    cfg = make_config(dp=True, **{"num-server-rounds": 5})
    q, k = _steps(cfg)
    e1, e2 = (privacy.epsilon_after(RDPAccountant(), 1e-5, noise_multiplier=1.0, rate=q, steps=r * k)
              for r in (1, 2))
    context = _context(**{"dp-max-epsilon": (e1 + e2) / 2, "state-dir": str(tmp_path)})
    assert not client_app.train(_message(cfg, 1), context).has_error()
    second = client_app.train(_message(cfg, 2), context)
    assert second.has_error() and second.error.code == wire.DP_POLICY_ERROR_CODE
    assert "> node config 'dp-max-epsilon'" in second.error.reason


@pytest.mark.deployed_node
def test_two_runs_on_one_deployed_node_compose_into_one_epsilon(make_config, tmp_path):
    """A deployed node's accountant spans every run on its data: run A (2 rounds) then
    run B (1 round, another name, another sigma) on one state-dir; the node's ledger
    holds all three rounds, and its epsilon equals dp-accounting's composition of the
    two Poisson-subsampled Gaussian mechanisms. Each run still reports its own spend."""
    node = {"state-dir": str(tmp_path)}
    a = make_config(dp=True)
    b = make_config(dp=True, **{"dp-noise-multiplier": 1.5})
    q, k = _steps(a)
    for rnd in (1, 2):
        assert not client_app.train(_message(a, rnd, run_tag="run-a"), _context(**node)).has_error()
    reply_b = client_app.train(_message(b, 1, run_tag="run-b"), _context(**node))
    ledger = privacy.load_ledger(RecordDict(), privacy.NODE_SCOPE,
                                 path=privacy.accountant_file(str(tmp_path), privacy.NODE_SCOPE, 0))
    assert ledger == [(1.0, q, k, "run-a"), (1.0, q, k, "run-a"), (1.5, q, k, "run-b")]
    theirs = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    theirs.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.0)), 2 * k)
    theirs.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.5)), k)
    node_epsilon = privacy.epsilon_after(privacy.accountant_of(ledger), 1e-5)
    assert node_epsilon == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-2)
    run_b_only = privacy.epsilon_after(RDPAccountant(), 1e-5, noise_multiplier=1.5, rate=q, steps=k)
    assert reply_b.content["metrics"][wire.DP_EPSILON] == pytest.approx(run_b_only)


@pytest.mark.deployed_node
def test_a_deployed_node_without_state_dir_refuses_dp_and_ignores_a_server_folder(make_config, tmp_path):
    cfg = make_config(dp=True)
    reply = client_app.train(_message(cfg, extra={wire.CLIENT_STATE_DIR: str(tmp_path)}), _context())
    assert reply.has_error() and "needs node config 'state-dir'" in reply.error.reason
    assert list(tmp_path.iterdir()) == []  # the server-sent folder was not written
    # without DP (e.g. SCAFFOLD's c_i) the server's folder is not used either
    msg = _message(make_config(), extra={wire.CLIENT_STATE_DIR: str(tmp_path)})
    assert client_app.state_dir(msg, _context()) == (None, False)
    assert client_app.state_dir(msg, _context(**{"state-dir": "/node/own"})) == ("/node/own", True)


def test_in_simulation_the_server_folder_is_used_and_each_run_has_its_own_spend(make_config, tmp_path):
    cfg = make_config(dp=True)
    for tag in ("run-a", "run-b"):
        reply = client_app.train(_message(cfg, run_tag=tag, extra={wire.CLIENT_STATE_DIR: str(tmp_path)}),
                                 _context())
        assert not reply.has_error()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["dp-accountant-run-a-p0.json", "dp-accountant-run-b-p0.json"]


def test_the_target_epsilon_caps_the_spend_of_a_lengthened_run(make_config):
    """Sigma is calibrated for 2 rounds to spend dp-target-epsilon; a third round (a
    resume with more num-server-rounds would try it) is refused: the target is a cap."""
    cfg = make_config(dp=True, **{"dp-target-epsilon": 2.0, "num-server-rounds": 2})
    context = _context()
    for rnd in (1, 2):
        reply = client_app.train(_message(cfg, rnd), context)
        assert not reply.has_error()
    assert reply.content["metrics"][wire.DP_EPSILON] <= 2.0
    third = client_app.train(_message(cfg, 3), context)
    assert third.has_error() and third.error.reason.startswith(wire.DP_OUT_OF_BUDGET)


# ---------------------------------------------------------------- nothing private in plaintext
def _query(node_config, level=None):
    content = RecordDict() if level is None else RecordDict(
        {"config": ConfigRecord({wire.DATA_STATS: level})})
    msg = Message(content, dst_node_id=5, message_type="query")
    return client_app.query(msg, _context(**node_config)).content["metrics"]


def test_a_query_reply_carries_only_the_statistics_the_level_allows(tmp_path):
    from tests.test_device_data import write_idx

    path = tmp_path / "own"
    write_idx(path, np.zeros((12, 8, 8), np.uint8), np.repeat(np.arange(3), 4))
    full = _query({"data-path": str(path)})
    assert full[wire.DATA_SIZE] == 12 and list(full[wire.LABEL_COUNTS])[:3] == [4, 4, 4]
    size_only = _query({"data-path": str(path)}, "size")
    assert size_only[wire.DATA_SIZE] == 12 and wire.LABEL_COUNTS not in size_only
    none = _query({"data-path": str(path)}, "none")
    assert wire.DATA_SIZE not in none and wire.LABEL_COUNTS not in none
    policy = _query({"data-path": str(path), "dp-required": True}, "all")  # the node decides
    assert wire.DATA_SIZE not in policy and wire.LABEL_COUNTS not in policy
    assert full[wire.KEEPS_STATE] == 0 and _query({"state-dir": str(tmp_path)})[wire.KEEPS_STATE] == 1


@pytest.mark.parametrize("mode", ["sample", "user"])
def test_under_dp_no_reply_carries_unnoised_metrics_or_sizes(make_config, mode):
    cfg = make_config(dp=True, **{"dp-mode": mode})
    reply = client_app.train(_message(cfg), _context())
    metrics = reply.content["metrics"]
    assert wire.TRAIN_LOSS not in metrics and wire.TRAIN_ACCURACY not in metrics
    if mode == "user":
        assert metrics[wire.NUM_EXAMPLES] == 1
        assert wire.LOCAL_STEPS not in metrics and wire.LOCAL_SECONDS not in metrics
    evaluation = Message(RecordDict({"arrays": _message(cfg).content["arrays"],
                                     "config": ConfigRecord({wire.RUN_CONFIG: cfg.to_json()})}),
                         dst_node_id=5, message_type="evaluate")
    refused = client_app.evaluate_fn(evaluation, _context())
    assert refused.has_error() and "federated evaluation under DP" in refused.error.reason


def test_policy_parsing():
    assert NodePolicy.from_node_config({"partition-id": 0}) is None
    policy = NodePolicy.from_node_config({"dp-required": "true", "dp-max-epsilon": 4})
    assert policy == NodePolicy(required=True, max_epsilon=4.0)
