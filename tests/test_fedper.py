"""FedPer (strategies/fedper.py): the personal layers never leave the client, survive a
restart and a round trained again after a resume, and k = 0 is FedAvg."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

import strategies
from fl_app import client_app
from fl_app.model import INIT_SEED_TAG, build_model
from fl_common import wire
from fl_common.randomness import derive_seed
from partitions import dataset_info
from strategies.fedper import (
    ACCEPTED_RECORD,
    FedPer,
    PersonalLayers,
    parametrised_layers,
    personal_modules,
    split_keys,
)

INFO = dataset_info("digits")


def _model(cfg):
    return build_model(INFO, seed=derive_seed(cfg.seed, INIT_SEED_TAG), kind=cfg.model)


def _message(cfg, server_round, arrays=None, kind="train", run_tag="run", used=None) -> Message:
    """A message as the server sends it; ``used``: the round the server last used this
    client's (partition 0's) reply in, its accepted entry (None: never)."""
    payload = strategies.spec(cfg.strategy).payload(cfg)
    arrays = arrays if arrays is not None else payload.initial(_model(cfg))
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({
        wire.RUN_CONFIG: cfg.to_json(), wire.RUN_TAG: run_tag, wire.SERVER_ROUND: server_round})})
    content[ACCEPTED_RECORD] = ConfigRecord({} if used is None else {"0": used})
    return Message(content, dst_node_id=5, message_type=kind)


def _context(**node_config) -> Context:
    return Context(run_id=1, node_id=5, state=RecordDict(), run_config={},
                   node_config={"partition-id": 0, "num-partitions": 4, **node_config})


def _arrays(reply) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in reply.content["arrays"].items()}


def test_the_cnn_splits_into_base_and_personal_layers(make_config):
    model = _model(make_config())
    assert parametrised_layers(model) == ["features.0", "features.4", "classifier.0", "classifier.2"]
    assert personal_modules(model, 1) == ["classifier.2"]
    assert personal_modules(model, 2) == ["classifier.0", "classifier.2"]
    assert personal_modules(model, "classifier.0") == ["classifier.0"]
    base, personal = split_keys(model, 1)
    assert personal == ["classifier.2.weight", "classifier.2.bias"]
    assert set(base) | set(personal) == set(model.state_dict()) and not set(base) & set(personal)


@pytest.mark.parametrize("model_kind, setting, fragment", [
    ("logreg", 1, "leaves nothing shared: this model has 1 parametrised layers"),
    ("cnn", 4, "accepted: 0 to 3"),
    ("cnn", "classifier.9", "names ['classifier.9'], which are not parametrised layers"),
    ("cnn", "features.0,features.4,classifier.0,classifier.2", "makes every layer personal"),
])
def test_a_split_that_shares_nothing_or_names_unknown_layers_is_refused(make_config, model_kind,
                                                                      setting, fragment):
    model = _model(make_config(model=model_kind))
    with pytest.raises(ValueError, match="Run config 'personal-layers'") as err:
        PersonalLayers(setting).check(model)
    assert fragment in str(err.value)


def test_the_personal_layers_never_leave_the_client(make_config):
    """The server starts from, and a client replies with, exactly the base arrays: the
    reply holds every base value (the CNN less its 650-value head) and nothing else."""
    cfg = make_config(strategy="fedper")
    model = _model(cfg)
    base, personal = split_keys(model, 1)
    initial = strategies.spec("fedper").payload(cfg).initial(model)
    assert sorted(initial.keys()) == sorted(base)
    reply = client_app.train(_message(cfg, 1), _context())
    arrays = _arrays(reply)
    assert sorted(arrays) == sorted(base) and not set(arrays) & set(personal)
    total = sum(p.numel() for p in model.parameters())
    assert sum(v.size for v in arrays.values()) == total - (64 * 10 + 10)


def test_fedper_with_no_personal_layers_is_fedavg(make_config):
    """k = 0: the same message gives FedAvg's reply, value for value."""
    fedavg = make_config()
    fedper = make_config(strategy="fedper", **{"personal-layers": 0})
    a = _arrays(client_app.train(_message(fedavg, 1), _context()))
    b = _arrays(client_app.train(_message(fedper, 1), _context()))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _committed(context) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in context.state["fedper-personal"].items()}


def test_the_personal_layers_are_committed_once_used_and_then_used_in_evaluation(make_config):
    """Round 1's layers stay pending; the evaluate message of round 1 says the reply was
    used: they are committed, and the evaluation scores the base with them (a fresh
    client, with the initial head, scores differently)."""
    cfg = make_config(strategy="fedper")
    context = _context()
    first = client_app.train(_message(cfg, 1), context)
    assert _committed(context) == {} and len(context.state["fedper-pending"]) == 2
    base = ArrayRecord({k: a for k, a in first.content["arrays"].items()})
    own = client_app.evaluate_fn(_message(cfg, 1, base, kind="evaluate", used=1), context)
    committed = _committed(context)
    initial_head = {k: v.detach().numpy() for k, v in _model(cfg).state_dict().items()
                    if k.startswith("classifier.2.")}
    assert sorted(committed) == sorted(initial_head)
    assert any(not np.array_equal(committed[k], initial_head[k]) for k in committed)  # trained
    fresh = client_app.evaluate_fn(_message(cfg, 1, base, kind="evaluate", used=1), _context())
    assert (own.content["metrics"]["val-loss"] != fresh.content["metrics"]["val-loss"])
    assert own.content["metrics"][wire.VAL_ACCURACY_SQ] == pytest.approx(
        own.content["metrics"]["val-accuracy"] ** 2)


def test_the_layers_of_an_unused_reply_are_dropped(make_config):
    """Round 1's reply was not used (rejected, lost, or its round rolled back): round 2
    starts from the initial layers, exactly as a client that never trained would."""
    cfg = make_config(strategy="fedper")
    context = _context()
    first = client_app.train(_message(cfg, 1), context)
    base = ArrayRecord({k: a for k, a in first.content["arrays"].items()})
    after_drop = _arrays(client_app.train(_message(cfg, 2, base, used=None), context))
    never = _arrays(client_app.train(_message(cfg, 2, base, used=None), _context()))
    assert all(np.array_equal(after_drop[k], never[k]) for k in never)
    kept = _arrays(client_app.train(_message(cfg, 2, base, used=1), _trained_once(cfg)))
    assert any(not np.array_equal(kept[k], never[k]) for k in never)


def _trained_once(cfg) -> Context:
    context = _context()
    client_app.train(_message(cfg, 1), context)
    return context


def test_the_personal_layers_survive_a_restart_and_a_round_trained_again(make_config, tmp_path):
    """A node with a state-dir trains round 1, restarts (empty Context.state), trains
    round 2 (round 1 was used); then round 2 is trained again, as after a crash and a
    resume (the server's map still says round 1): the second round-2 reply equals the
    first, because the interrupted round's pending layers are dropped."""
    cfg = make_config(strategy="fedper")
    node = {"state-dir": str(tmp_path)}
    first = client_app.train(_message(cfg, 1), _context(**node))
    base = ArrayRecord({k: a for k, a in first.content["arrays"].items()})
    round2 = _arrays(client_app.train(_message(cfg, 2, base, used=1), _context(**node)))
    again = _arrays(client_app.train(_message(cfg, 2, base, used=1), _context(**node)))
    assert all(np.array_equal(round2[k], again[k]) for k in round2)
    # without the state-dir the restarted node would have started from the initial head
    forgetful = _arrays(client_app.train(_message(cfg, 2, base, used=1), _context()))
    assert any(not np.array_equal(round2[k], forgetful[k]) for k in round2)
    assert [p.name for p in tmp_path.iterdir()] == ["fedper-run-p0.npz"]


def test_the_server_marks_only_the_replies_it_used_and_sends_each_client_its_entry():
    from tests.helpers import make_grid, make_reply

    x = {"w": np.zeros(3, np.float32)}
    server = FedPer(personal_layers=1, member_of={11: 0, 12: 1, 13: 2}.get,
                    min_train_nodes=1, min_available_nodes=1)
    guard = strategies.guarded("fedper", server)
    guard.configure_train(1, ArrayRecord({"w": Array(x["w"])}), ConfigRecord(), make_grid([11, 12, 13]))
    replies = [make_reply({"w": np.ones(3, np.float32)}, node_id=11),
               make_reply({"w": np.full(3, np.nan, np.float32)}, node_id=12),  # rejected
               make_reply({"w": np.ones(3, np.float32)}, node_id=13)]
    guard.aggregate_train(1, replies)
    assert server.accepted == {0: 1, 2: 1}
    messages = list(guard.configure_train(2, ArrayRecord({"w": Array(x["w"])}), ConfigRecord(),
                                          make_grid([11, 12, 13])))
    entries = {m.metadata.dst_node_id: dict(m.content[ACCEPTED_RECORD]) for m in messages}
    assert entries == {11: {"0": 1}, 12: {}, 13: {"2": 1}}
    evaluate = list(guard.configure_evaluate(2, ArrayRecord({"w": Array(x["w"])}), ConfigRecord(),
                                             make_grid([11, 12, 13])))
    assert {m.metadata.dst_node_id: dict(m.content[ACCEPTED_RECORD]) for m in evaluate} == entries


def test_another_run_starts_from_the_initial_personal_layers(make_config):
    cfg = make_config(strategy="fedper")
    context = _context()
    client_app.train(_message(cfg, 1, run_tag="a"), context)
    fresh = _arrays(client_app.train(_message(cfg, 1, run_tag="b"), _context()))
    reused = _arrays(client_app.train(_message(cfg, 1, run_tag="b"), context))
    assert all(np.array_equal(fresh[k], reused[k]) for k in fresh)


def test_fedper_is_refused_with_the_robust_rules_reasons_not_needed_but_validated(make_config):
    with pytest.raises(ValueError, match="'personal-layers' must be an integer >= 0"):
        make_config(strategy="fedper", **{"personal-layers": -1})
    assert make_config(strategy="fedper", **{"personal-layers": "classifier.2"}).personal_layers \
        == "classifier.2"


def test_fedper_under_sample_level_dp_keeps_its_layers_and_accounts_every_step(make_config):
    """DP-SGD trains base and personal layers alike (Opacus on the whole model); the reply
    still holds the base only, and the spend is DP-SGD's for one epoch."""
    from fl_app import privacy
    from partitions import load_client_data

    cfg = make_config(strategy="fedper", dp=True)
    context = _context()
    reply = client_app.train(_message(cfg, 1), context)
    base, personal = split_keys(_model(cfg), 1)
    assert sorted(_arrays(reply)) == sorted(base)
    n = len(load_client_data(cfg.data, 0, 4).train)
    q, k = privacy.sample_rate(n, cfg.batch_size), privacy.steps_per_epoch(n, cfg.batch_size)
    expected = privacy.epsilon_after(privacy.accountant_of([]), 1e-5, noise_multiplier=1.0,
                                     rate=q, steps=k)
    assert reply.content["metrics"][wire.DP_EPSILON] == pytest.approx(expected)
    assert sorted(context.state["fedper-pending"].keys()) == sorted(personal)


def test_fedper_under_user_level_dp_clips_only_what_travels(make_config):
    """User-level DP's clipping mod sees the base arrays only (the update it clips is the
    base's), and the personal layers still stay behind."""
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    cfg = make_config(strategy="fedper", dp=True, **{"dp-mode": "user", "dp-max-grad-norm": 0.01})
    msg = _message(cfg, 1)
    msg.content["config"][KEY_CLIPPING_NORM] = 0.01
    sent = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    reply = client_app.app(msg, _context())  # through the mods, as Flower calls it
    arrays = _arrays(reply)
    assert sorted(arrays) == sorted(sent)
    norm = np.sqrt(sum(float(np.sum((arrays[k].astype(np.float64) - sent[k]) ** 2)) for k in sent))
    assert norm == pytest.approx(0.01, rel=1e-3)


def test_fedavg_with_local_fine_tuning_scores_the_fine_tuned_copy(make_config):
    """The personalization baseline (eval-finetune-epochs = 1): an evaluating client
    trains the received model one epoch on its own training data, then scores it; the
    same steps by hand give the same loss, and the reply carries the square for the
    spread. Nothing of the fine-tuning is kept: the next evaluation starts again."""
    from fl_app.training import evaluate, train_local
    from partitions import load_client_data

    cfg = make_config(**{"eval-finetune-epochs": 1})
    msg = _message(cfg, 3, kind="evaluate")
    context = _context()
    reply = client_app.evaluate_fn(msg, context)
    model = _model(cfg)
    data = load_client_data(cfg.data, 0, 4)
    train_local(model, data.train, epochs=1, batch_size=cfg.batch_size, lr=float(cfg.lr),
                momentum=float(cfg.momentum),
                seed=derive_seed(cfg.seed, client_app.FINETUNE_TAG, 3, 0))
    loss, accuracy = evaluate(model, data.val)
    metrics = reply.content["metrics"]
    assert metrics["val-loss"] == pytest.approx(loss, rel=1e-6)
    assert metrics[wire.VAL_ACCURACY_SQ] == pytest.approx(accuracy ** 2)
    plain = client_app.evaluate_fn(_message(make_config(), 3, kind="evaluate"), _context())
    assert plain.content["metrics"]["val-loss"] > metrics["val-loss"]  # the untrained model
    again = client_app.evaluate_fn(msg, context)
    assert again.content["metrics"]["val-loss"] == metrics["val-loss"]
