"""The randomness DP-SGD relies on is secret: a server that knows the run config cannot
regenerate a client's noise or its Poisson batches (fl_app/privacy.py,
fl_common/randomness.py).

The attack is the privacy review's: the server chose ``seed``, so with seeded noise it
draws the same noise, subtracts it from the reply and holds the noiseless update.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fl_app import client_app, privacy
from fl_common import wire
from fl_app.model import build_model
from fl_app.training import train_local
from fl_common.randomness import derive_seed, mt_state_words, secret_torch_generator
from partitions import DataConfig, ImageArrays, dataset_info, load_client_data

PID, ROUND, LR = 0, 3, 0.05


@pytest.fixture(scope="module")
def batch():
    """32 digits: with batch-size 32 one epoch is one DP-SGD step with q = 1 (every
    example in the batch), so the reply is x - lr (S + Z) / 32."""
    data = load_client_data(DataConfig("digits", "iid", 0.5, 2, 2, 0.1, 0), PID, 2).train
    return ImageArrays(data.x[:32], data.y[:32])


def _reply(make_config, data, randomness, sigma):
    cfg = make_config(dp=True, **{"dp-randomness": randomness, "momentum": 0.0,
                                  "batch-size": 32, "lr": LR})
    model = build_model(dataset_info("digits"), seed=0)
    client_round = privacy.ClientRound(cfg, RecordDict(), None, run_tag="run", partition_id=PID,
                                       num_examples=len(data), server_round=ROUND)
    settings = dataclasses.replace(client_round.settings, noise_multiplier=sigma)
    train_local(model, data, epochs=1, batch_size=32, lr=LR, momentum=0.0,
                seed=derive_seed(cfg.seed, ROUND, PID),
                dp=privacy.DPSGD(settings, client_round.accountant))
    return cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _regenerate_noise(cfg, model_keys):
    """The server's guess of the noise: Opacus draws N(0, (sigma C)^2) per parameter, in
    parameter order, from a generator it seeds as the seeded code does."""
    generator = torch.Generator().manual_seed(
        derive_seed(cfg.seed, ROUND, PID, privacy.NOISE_TAG))
    std = cfg.dp_noise_multiplier * cfg.dp_max_grad_norm
    return {k: torch.normal(0.0, std, size=shape, generator=generator) for k, shape in model_keys}


def _attack(make_config, data, randomness):
    """(distance of the attacker's estimate to the noiseless update, noise norm)."""
    cfg, noisy = _reply(make_config, data, randomness, sigma=1.0)
    _, clean = _reply(make_config, data, "seeded", sigma=0.0)  # same batch (q = 1), no noise
    model = build_model(dataset_info("digits"), seed=0)
    keys = [(name, p.shape) for name, p in model.named_parameters()]
    noise = _regenerate_noise(cfg, keys)
    estimate = {k: noisy[k] + LR * noise[k] / 32 for k, _ in keys}
    distance = sum(float(torch.sum((estimate[k] - clean[k]) ** 2)) for k, _ in keys) ** 0.5
    noise_norm = sum(float(torch.sum((noisy[k] - clean[k]) ** 2)) for k, _ in keys) ** 0.5
    return distance, noise_norm


def test_with_seeded_randomness_the_server_removes_the_noise(make_config, batch):
    """The attack works on "seeded" (so this file's tests can fail): the estimate is the
    noiseless update to float precision, while the noise itself is large."""
    distance, noise_norm = _attack(make_config, batch, "seeded")
    assert noise_norm > 0.05 and distance < 1e-5


def test_with_secure_randomness_the_same_attack_fails(make_config, batch):
    """Default "secure": subtracting the regenerated noise adds a second, independent
    noise of the same size instead of removing the first (distance ~ sqrt(2) x)."""
    distance, noise_norm = _attack(make_config, batch, "secure")
    assert noise_norm > 0.05
    assert distance == pytest.approx(np.sqrt(2) * noise_norm, rel=0.15)


def _message(cfg) -> Message:
    model = build_model(dataset_info(cfg.dataset), seed=0)
    return Message(RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "config": ConfigRecord({wire.RUN_CONFIG: cfg.to_json(), wire.RUN_TAG: "run",
                                wire.SERVER_ROUND: 1}),
    }), dst_node_id=5, message_type="train")


def _train_twice(cfg):
    out = []
    for _ in range(2):
        context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 4},
                          state=RecordDict(), run_config={})
        reply = client_app.train(_message(cfg), context)
        out.append({k: a.numpy() for k, a in reply.content["arrays"].items()})
    return out


def test_two_identical_train_messages_get_different_noise_and_batches(make_config):
    """The ClientApp, end to end: the same message twice gives two different replies
    under "secure" (the default), the same reply twice under "seeded"."""
    cfg = make_config(dp=True)
    assert cfg.dp_randomness == "secure"
    first, second = _train_twice(cfg)
    assert all(np.abs(first[k] - second[k]).max() > 1e-4 for k in first if "weight" in k)
    first, second = _train_twice(cfg.replace(**{"dp-randomness": "seeded"}))
    assert all(np.array_equal(first[k], second[k]) for k in first)


def test_the_secret_generator_is_keyed_in_all_624_words_of_mt19937():
    """torch's manual_seed keeps 32 bits of a seed; the secret generator's state is 624
    fresh words from the OS (no two generators alike, no word pattern of a seeding)."""
    a, b = mt_state_words(secret_torch_generator()), mt_state_words(secret_torch_generator())
    assert a.shape == (624,) and (a < 2**32).all()
    assert not np.array_equal(a, b)
    seeded = mt_state_words(torch.Generator().manual_seed(12345))
    assert seeded[0] == 12345 and a[0] != seeded[0] or not np.array_equal(a, seeded)
    # the words are used: two generators with the same words draw the same numbers
    g1, g2 = secret_torch_generator(), torch.Generator()
    g2.set_state(g1.get_state())
    assert torch.equal(torch.randn(8, generator=g1), torch.randn(8, generator=g2))
    # and roughly uniform: the mean of 624 uniform 32-bit words is 2^31 +- 1.2e8 (4 sd)
    assert abs(float(a.mean()) - 2**31) < 4 * 2**32 / np.sqrt(12 * 624)


def test_secure_settings_take_no_seeds_and_seeded_needs_both():
    with pytest.raises(ValueError, match="takes no seeds"):
        privacy.DPSettings(1.0, 1.0, 1e-5, noise_seed=3)
    with pytest.raises(ValueError, match="needs both"):
        privacy.DPSettings(1.0, 1.0, 1e-5, randomness="seeded", noise_seed=3)
    with pytest.raises(ValueError, match="'dp-randomness' must be one of"):
        from fl_app.config import RunConfig, default_run_config

        RunConfig.from_mapping({**default_run_config(), "dp": True, "dp-randomness": "os"})
