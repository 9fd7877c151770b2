"""Model and local training: sizes, learning, determinism, and an exact evaluation."""

from __future__ import annotations

import math

import pytest

import numpy as np
import torch
from torch import nn

from fl_app.model import build_model, num_parameters
from fl_app.training import LocalHooks, evaluate, train_local
from partitions import (
    DataConfig,
    DatasetInfo,
    ImageArrays,
    check_partitions,
    dataset_info,
    load_client_data,
    train_sizes,
)


def digits_client(pid=0, n=2):
    cfg = DataConfig("digits", "iid", 0.5, 2, 2, 0.2, 0)
    return load_client_data(cfg, pid, n)


def test_model_sizes():
    assert num_parameters(build_model(DatasetInfo((1, 28, 28), 10, 1, 1))) == 46_826
    model = build_model(dataset_info("digits"))
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_seeded_model_init_is_reproducible():
    info = dataset_info("digits")
    a, b, c = build_model(info, seed=1), build_model(info, seed=1), build_model(info, seed=2)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not all(torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))


def test_local_training_learns():
    data = digits_client()
    model = build_model(dataset_info("digits"), seed=0)
    loss_before, acc_before = evaluate(model, data.val)
    train_local(model, data.train, epochs=5, batch_size=32, lr=0.05, momentum=0.9, seed=0)
    loss_after, acc_after = evaluate(model, data.val)
    assert loss_after < 0.5 * loss_before
    assert acc_after > 0.8 > acc_before + 0.3


def test_same_seed_same_weights_other_seed_other_weights():
    data = digits_client()
    def run(seed):
        model = build_model(dataset_info("digits"), seed=0)
        result = train_local(model, data.train, epochs=1, batch_size=16, lr=0.05, seed=seed)
        return model.state_dict(), result
    (a, ra), (b, rb), (c, _) = run(7), run(7), run(8)
    assert all(torch.equal(a[k], b[k]) for k in a) and ra == rb
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert ra.steps == math.ceil(len(data.train) / 16) and ra.num_examples == len(data.train)


def test_penalty_hook_enters_the_gradient():
    """A huge L2 penalty must pull the weights toward zero compared with no penalty."""
    data = digits_client()
    def norm_after(hooks):
        model = build_model(dataset_info("digits"), seed=0)
        train_local(model, data.train, epochs=1, batch_size=32, lr=0.01, seed=0, hooks=hooks)
        return float(sum(p.detach().pow(2).sum() for p in model.parameters()))
    penalty = LocalHooks(penalty=lambda m: 5.0 * sum(p.pow(2).sum() for p in m.parameters()))
    assert norm_after(penalty) < 0.5 * norm_after(LocalHooks())


def test_evaluate_matches_hand_computed_loss_and_accuracy():
    """Logits = (x, -x): samples x=+1 (label 0, right), x=-1 (label 0, wrong), x=2 (label 1, wrong).
    CE = [log(1+e^-2), log(1+e^2), log(1+e^4)]; accuracy 1/3."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0], [-1.0]]))
    x = np.array([1.0, -1.0, 2.0], dtype=np.float32).reshape(3, 1, 1, 1)
    data = ImageArrays(x, np.array([0, 0, 1]))
    loss, acc = evaluate(model, data, batch_size=2)
    expected = (math.log1p(math.exp(-2)) + math.log1p(math.exp(2)) + math.log1p(math.exp(4))) / 3
    assert math.isclose(loss, expected, rel_tol=1e-6)
    assert math.isclose(acc, 1 / 3)


@pytest.mark.parametrize("kind, expected", [("cnn", 46_826), ("mlp", 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10),
                                            ("logreg", 784 * 10 + 10)])
def test_each_model_has_its_documented_size_and_trains(kind, expected):
    """Parameter counts by hand (28x28 input, 10 classes); one epoch on digits lowers the loss."""
    assert num_parameters(build_model(DatasetInfo((1, 28, 28), 10, 1, 1), kind=kind)) == expected
    data = load_client_data(DataConfig("digits", "iid", 0.5, 2, 2, 0.2, 0), 0, 2).train
    model = build_model(dataset_info("digits"), seed=0, kind=kind)
    first = train_local(model, data, epochs=1, batch_size=32, lr=0.05, seed=0)
    second = train_local(model, data, epochs=1, batch_size=32, lr=0.05, seed=1)
    assert second.loss < first.loss


def test_logreg_is_a_linear_map_of_the_flattened_image():
    model = build_model(dataset_info("digits"), seed=0, kind="logreg")
    x = torch.randn(3, 1, 8, 8)
    expected = x.flatten(1) @ model.linear.weight.T + model.linear.bias
    torch.testing.assert_close(model(x), expected)


def test_server_knows_each_partition_training_size():
    """train_sizes(partition sizes) equals what train_val_split hands each client."""
    cfg = DataConfig("digits", "dirichlet", 0.3, 2, 2, 0.15, 4)
    sizes = check_partitions(cfg, 5)
    assert train_sizes(sizes, 0.15) == [len(load_client_data(cfg, p, 5).train) for p in range(5)]


# ------------------------------------------------------------------ device selection
@pytest.mark.parametrize("setting,cuda,expected", [
    ("auto", False, "cpu"), ("auto", True, "cuda"), ("cpu", True, "cpu"), ("cpu", False, "cpu"),
    ("cuda", True, "cuda"),
])
def test_device_setting_resolves_as_documented(setting, cuda, expected):
    from fl_app.training import resolve_device

    assert resolve_device(setting, cuda_available=cuda).type == expected


def test_cuda_without_a_gpu_and_unknown_devices_are_refused_naming_the_key(make_config):
    from fl_app.training import resolve_device

    with pytest.raises(ValueError, match=r"'device' = \"cuda\" but this process sees no CUDA"):
        resolve_device("cuda", cuda_available=False)
    with pytest.raises(ValueError, match=r"Run config 'device' must be one of \['auto', 'cpu', 'cuda'\]"):
        make_config(device="gpu")


GPU_CHECK_DEVICES = ("cpu", "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["fedavg", "fedprox", "scaffold"])
def test_training_on_the_gpu_matches_the_cpu(name):
    """The same seeded local round on the CPU and on the GPU: the same batches, weights
    within float32 tolerance, and the client half's arrays back in host memory."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    import strategies
    from fl_common import wire
    from strategies.scaffold import C_RECORD

    info = dataset_info("digits")
    data = load_client_data(DataConfig("digits", "iid", 0.5, 2, 2, 0.1, 0), 0, 4)
    results = {}
    for device in GPU_CHECK_DEVICES:
        model = build_model(info, seed=0).to(device)
        content = RecordDict({wire.CONFIG: ConfigRecord({"proximal-mu": 0.1, wire.SERVER_ROUND: 1,
                                                          wire.RUN_TAG: "gpu-check"})})
        if name == "scaffold":
            content[C_RECORD] = ArrayRecord({k: v.cpu() for k, v in build_model(info, seed=5).state_dict().items()})
        half = strategies.spec(name).client_half(
            strategies.ClientInputs(model, content, RecordDict(), 0.05, 1))
        result = train_local(model, data.train, epochs=1, batch_size=32, lr=0.05, momentum=0.9,
                             seed=3, hooks=half.hooks)
        model.to("cpu")
        extra = half.finish(model, result.steps)
        results[device] = ({k: v.numpy() for k, v in model.state_dict().items()}, extra)
    cpu, gpu = (results[d] for d in GPU_CHECK_DEVICES)
    for key, value in cpu[0].items():
        np.testing.assert_allclose(gpu[0][key], value, rtol=1e-3, atol=1e-4)
    assert set(gpu[1]) == set(cpu[1])
    for key, value in cpu[1].items():
        assert isinstance(gpu[1][key], np.ndarray)
        np.testing.assert_allclose(gpu[1][key], value, rtol=1e-3, atol=1e-4)
