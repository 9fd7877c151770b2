"""Gradient inversion (experiments/inversion.py): the attack must reconstruct when nothing
protects the update, and must not under strong DP noise; label recovery by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments import inversion as inv
from partitions import DataConfig, ImageArrays, dataset_info, load_client_data

# Measured (docs/privacy.md, "Gradient inversion"): the plain one-step batch-1 attack on
# image 2 of the test client reaches ~57 dB at 200 iterations; a reconstruction that
# fails reaches ~10-13 dB, the server's mean image ~10 dB. 30 dB is a clear success.
SUCCESS_PSNR = 30.0
LR = 0.05


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    info = dataset_info("digits")
    model = inv.build_model(info, 0, kind="cnn")
    client = load_client_data(DataConfig("digits", "iid", 0.5, 2, 2, 0.1, 0), 0, 10).train
    return info, model, client


def _attack(info, model, data, update, iterations=200):
    labels = inv.recover_labels(model, update, n=len(data), lr=LR)
    rec = inv.invert(model, update, labels, image_shape=tuple(info.image_shape), lr=LR,
                     config=inv.AttackConfig(iterations=iterations, seed=0))
    return inv.score(rec, data.x, data.y)


def test_idlg_hand_made():
    """One example: g_W = (p - onehot(y)) h^T with h >= 0; only row y is non-positive."""
    rng = np.random.default_rng(0)
    for y in range(10):
        h = torch.from_numpy(np.abs(rng.normal(size=64))).float()
        p = torch.softmax(torch.from_numpy(rng.normal(size=10)).float(), 0)
        g = torch.outer(p - torch.nn.functional.one_hot(torch.tensor(y), 10).float(), h)
        assert inv.idlg_label(g) == y
        assert inv.idlg_label(-g) != y  # an update is -lr * gradient: the sign matters


def test_label_counts_hand_made():
    """Several examples: S = sum_i (p_i - onehot(y_i)); counts = n pbar - S, exactly when
    pbar is the batch's own mean softmax."""
    rng = np.random.default_rng(1)
    labels = np.array([1, 1, 4, 7, 9, 9, 9])
    p = torch.softmax(torch.from_numpy(rng.normal(size=(7, 10))).float(), 1)
    summed = (p - torch.nn.functional.one_hot(torch.from_numpy(labels), 10).float()).sum(0)
    counts = inv.label_counts(summed, p.mean(0), 7)
    assert counts.tolist() == np.bincount(labels, minlength=10).tolist()
    assert inv.label_recovery_rate(np.repeat(np.arange(10), counts), labels) == 1.0
    assert inv.label_recovery_rate([1, 1, 4, 7, 9, 9, 0], labels) == pytest.approx(6 / 7)


def test_idlg_on_the_apps_update(setup):
    """The app's own one-step update (train_local) gives every label away, batch 1."""
    _, model, client = setup
    for i in range(10):
        data = ImageArrays(client.x[i:i + 1], client.y[i:i + 1])
        update = inv.client_update(model, data, batch_size=1, lr=LR)
        assert int(inv.recover_labels(model, update, n=1, lr=LR)[0]) == int(client.y[i])


def test_simulated_update_is_train_locals(setup):
    """The attacker's unrolled local training (one epoch, batch 32, momentum 0.9) on the true
    data in train_local's shuffled order reproduces the client's update."""
    _, model, client = setup
    data = ImageArrays(client.x[:70], client.y[:70])
    update = inv.client_update(model, data, batch_size=32, lr=LR, momentum=0.9, seed=3)
    order = torch.randperm(70, generator=torch.Generator().manual_seed(3))  # train_local's
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    sim = inv.simulated_update(model, params, torch.from_numpy(data.x)[order],
                               torch.from_numpy(data.y)[order], lr=LR, momentum=0.9,
                               batch_size=32)
    for (name, expected), got in zip(update.items(), sim):
        torch.testing.assert_close(got.detach(), expected, rtol=1e-4, atol=1e-6, msg=name)


def test_attack_succeeds_without_protection(setup):
    """Batch 1, one local step, plain update: the image comes back (and its label)."""
    info, model, client = setup
    data = ImageArrays(client.x[2:3], client.y[2:3])
    result = _attack(info, model, data, inv.client_update(model, data, batch_size=1, lr=LR))
    assert result["psnr"][0] > SUCCESS_PSNR
    assert result["ssim"][0] > 0.95
    assert result["label_recovery"] == 1.0


def test_clipping_alone_does_not_protect_but_dp_noise_does(setup):
    """The same image under DP-SGD (Opacus, batch 1, q = 1): clipping without noise leaves
    the direction intact and the attack still succeeds; at epsilon 1 for the round
    (sigma ~4.06) it fails to reach the success threshold."""
    info, model, client = setup
    data = ImageArrays(client.x[2:3], client.y[2:3])
    clipped, sigma0, _ = inv.dp_update(model, data, target_epsilon=0.0, lr=LR)
    assert sigma0 == 0.0
    assert _attack(info, model, data, clipped)["psnr"][0] > SUCCESS_PSNR
    noisy, sigma, spent = inv.dp_update(model, data, target_epsilon=1.0, lr=LR)
    assert spent == pytest.approx(1.0, abs=0.05) and sigma > 3
    assert _attack(info, model, data, noisy)["psnr"][0] < SUCCESS_PSNR - 10


def test_secagg_sum_is_the_sum(setup):
    """Flower's quantization, summed and dequantized, is the sum to within its step."""
    _, model, client = setup
    updates = [inv.client_update(model, ImageArrays(client.x[i:i + 1], client.y[i:i + 1]),
                                 batch_size=1, lr=LR) for i in range(4)]
    total = inv.secagg_sum(updates, [1, 1, 1, 1])
    step = 2 * 8.0 / 4194304
    for name in total:
        exact = sum(u[name] for u in updates)
        assert float((total[name] - exact).abs().max()) <= 4 * step + 1e-6


def test_metrics():
    rng = np.random.default_rng(2)
    a = rng.uniform(size=(3, 1, 8, 8))
    assert inv.psnr(a[0], a[0]) == 100.0
    assert inv.ssim(a[0], a[0]) == pytest.approx(1.0)
    noisy = np.clip(a[0] + rng.normal(scale=0.2, size=a[0].shape), 0, 1)
    assert inv.ssim(a[0], noisy) < 0.9
    assert inv.ssim(a[0], noisy) == pytest.approx(inv.ssim(noisy, a[0]))
    assert inv.psnr(a[0], noisy) == pytest.approx(-10 * np.log10(np.mean((a[0] - noisy) ** 2)))
    assert inv.best_match(a[[2, 0, 1]], a).tolist() == [1, 2, 0]


def test_ssim_matches_scikit_image():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(3)
    for size in (8, 28):
        a = rng.uniform(size=(size, size))
        b = np.clip(a + rng.normal(scale=0.3, size=a.shape), 0, 1)
        expected = skimage_metrics.structural_similarity(a, b, data_range=1.0)
        assert inv.ssim(a[None], b[None]) == pytest.approx(expected, abs=1e-9)


def test_case_names_follow_the_dp_epsilons_and_unknown_cases_are_refused(capsys):
    """The DP cases exist for each epsilon asked for, in decreasing order after the plain
    and SecAgg+ cases; a case no epsilon names is refused before anything is attacked."""
    assert inv.case_names([1, 8, 4]) == [
        "plain-b1", "plain-b4", "plain-b8", "secagg", "dp-clip-only",
        "dp-eps8", "dp-eps4", "dp-eps1", "default-epoch",
        "default-epoch-dp8", "default-epoch-dp4", "default-epoch-dp1"]
    assert inv.case_names(inv.Setting.dp_epsilons)[5:7] == ["dp-eps8", "dp-eps1"]
    assert inv._ordered({"default-epoch-dp0.5", "dp-eps0.5", "plain-b1", "dp-eps2"}) == [
        "plain-b1", "dp-eps2", "dp-eps0.5", "default-epoch-dp0.5"]
    with pytest.raises(SystemExit):
        inv.main(["--dp-epsilons", "8", "4", "--cases", "dp-eps2"])
    err = capsys.readouterr().err
    assert "unknown case(s) dp-eps2 for --dp-epsilons 8 4" in err and "dp-eps4" in err


def test_the_table_is_built_from_the_records(tmp_path):
    """table.md's rows are the record's numbers, rounded: a hand-made record with two DP
    epsilons gives its rows in case order, the labels as counts out of the images."""
    import json

    case = {"images": 8, "attacks": 8, "psnr_mean": 30.04, "psnr_std": 1.96, "psnr_min": 27.0,
            "psnr_max": 33.25, "ssim_mean": 0.9876, "label_recovery": 0.875}
    record = {"setting": {"dataset": "digits", "model": "cnn", "partition": 0, "num_partitions": 10,
                          "images": 8, "secagg_clients": 4, "batch_size": 32, "momentum": 0.9,
                          "attack": {"iterations": 400}},
              "cases": {"dp-eps0.5": {**case, "target_epsilon": 0.5, "sigma": 7.1234},
                        "plain-b1": case,
                        "prior-mean-image": {"psnr_mean": 11.57, "ssim_mean": 0.5563, "images": 8}}}
    (tmp_path / "digits-cnn.json").write_text(json.dumps(record))
    rows = [line for line in inv.build_table(tmp_path).splitlines() if line.startswith("| ")][1:]
    assert rows == [
        "| no attack: the server's mean test image | – | 8 | 11.6 | 0.556 | – |",
        "| plain, one step, batch 1 | y - x | 8 (8) | 30.0 ± 2.0 [27.0, 33.2] | 0.988 | 7 / 8 (iDLG) |",
        "| DP-SGD epsilon 0.5 (sigma 7.12), batch 1 | y - x | 8 (8) | 30.0 ± 2.0 [27.0, 33.2] "
        "| 0.988 | 7 / 8 (iDLG) |"]
