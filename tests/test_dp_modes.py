"""Opacus's per-sample-gradient modes ("hooks", "functorch", "ew") under the app's DP-SGD
(``fl_app.privacy.PrivateTraining``), and the empty Poisson batch, whose step the app takes
without a forward pass (``empty_step``): each mode's privatized gradient against one
computed here by hand (a backward pass per example, clipped to C, summed, divided by the
expected batch size), the empty step against the noise drawn by hand from a generator of
the same seed, and whole epochs with many empty batches equal across the modes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from fl_app import privacy
from fl_app.model import build_model
from fl_app.training import train_local
from partitions import ImageArrays, dataset_info

INFO = dataset_info("digits")
C = 0.5  # small enough that most per-example gradients are clipped


def _data(n: int, seed: int = 0) -> ImageArrays:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, *INFO.image_shape)).astype(np.float32)
    y = rng.integers(0, INFO.num_classes, size=n).astype(np.int64)
    return ImageArrays(x, y)


def _private(mode: str, n: int, batch_size: int, sigma: float, accountant=None):
    model = build_model(INFO, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    settings = privacy.DPSettings(sigma, C, 1e-5, randomness="seeded", noise_seed=7,
                                  sampler_seed=3, grad_sample_mode=mode)
    return model, privacy.PrivateTraining(model, opt, settings, num_examples=n,
                                          batch_size=batch_size,
                                          accountant=RDPAccountant() if accountant is None else accountant)


def _grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten().clone() for p in model.parameters()])


def _by_hand(data: ImageArrays, expected_batch: float) -> torch.Tensor:
    """sum_i clip_C(g_i) / (q n), one backward pass per example, no Opacus."""
    model = build_model(INFO, seed=0)
    total = None
    for i in range(len(data.y)):
        model.zero_grad()
        x, y = torch.from_numpy(data.x[i:i + 1]), torch.from_numpy(data.y[i:i + 1])
        torch.nn.functional.cross_entropy(model(x), y).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        g = g * min(1.0, C / (float(g.norm()) + 1e-6))
        total = g if total is None else total + g
    return total / expected_batch


@pytest.mark.parametrize("mode", privacy.GRAD_SAMPLE_MODES)
def test_each_mode_clips_and_sums_the_per_example_gradients_as_by_hand(mode):
    data = _data(12)
    model, private = _private(mode, n=48, batch_size=12, sigma=0.0)
    private.zero_grad()
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    torch.nn.functional.cross_entropy(private.module(x), y).backward()
    private.step()
    got = _grad(model)
    private.close()
    want = _by_hand(data, expected_batch=private.rate * 48)
    assert private.rate * 48 == pytest.approx(12.0)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), float((got - want).abs().max())


@pytest.mark.parametrize("mode", privacy.GRAD_SAMPLE_MODES)
def test_the_empty_step_is_the_noise_alone_and_is_counted(mode):
    sigma, n, batch = 1.3, 40, 8
    accountant = RDPAccountant()
    model, private = _private(mode, n=n, batch_size=batch, sigma=sigma, accountant=accountant)
    private.zero_grad()
    private.empty_step()
    got = _grad(model)
    private.close()
    g = torch.Generator().manual_seed(7)  # Opacus's noise: N(0, (sigma C)^2) per parameter
    noise = torch.cat([torch.normal(0.0, sigma * C, p.shape, generator=g).flatten()
                       for p in model.parameters()])
    q = privacy.sample_rate(n, batch)
    assert torch.allclose(got, noise / (q * n), rtol=1e-6, atol=1e-8)
    assert float(got.norm()) > 0.5  # not zero: the noise is there
    assert accountant.history == [(sigma, q, 1)]


def test_the_empty_step_post_processes_like_any_other():
    seen = []
    model, private = _private("ew", n=40, batch_size=8, sigma=1.0)
    private.zero_grad()
    private.empty_step(lambda m: seen.append(_grad(m)))
    private.close()
    assert len(seen) == 1 and seen[0].norm() > 0


def test_epochs_with_many_empty_batches_give_the_same_model_in_every_mode():
    """n = 30, batch 1: q = 1/30, about 36 % of the 30 steps of an epoch are empty. Same
    seeds, so the same batches and noise: the modes must end at the same weights, and
    every step (empty or not) must be counted."""
    data = _data(30, seed=1)
    steps_per_epoch = privacy.steps_per_epoch(30, 1)
    results = {}
    for mode in privacy.GRAD_SAMPLE_MODES:
        model = build_model(INFO, seed=0)
        accountant = RDPAccountant()
        settings = privacy.DPSettings(0.8, C, 1e-5, randomness="seeded", noise_seed=11,
                                      sampler_seed=5, grad_sample_mode=mode)
        out = train_local(model, data, epochs=1, batch_size=1, lr=0.05, seed=0,
                          dp=privacy.DPSGD(settings, accountant))
        assert out.steps == steps_per_epoch
        assert sum(k for *_, k in accountant.history) == steps_per_epoch
        results[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
    for mode, weights in results.items():
        assert torch.allclose(weights, results["hooks"], rtol=1e-4, atol=1e-6), mode
    start = torch.cat([p.detach().flatten() for p in build_model(INFO, seed=0).parameters()])
    assert float((results["hooks"] - start).norm()) > 0.01  # it trained


def test_an_epoch_of_batch_one_has_empty_batches():
    """The case above is the case that matters: Opacus's sampler, at q = 1/30, gives
    empty batches (probability (1 - q)^30 ~ 0.36 each)."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    q = privacy.sample_rate(30, 1)
    batches = list(UniformWithReplacementSampler(
        num_samples=30, sample_rate=q, generator=torch.Generator().manual_seed(5)))
    empty = sum(1 for b in batches if len(b) == 0)
    assert len(batches) == 30 and empty >= 5
    assert math.isclose((1 - q) ** 30, 0.3616, rel_tol=1e-3)
