"""Gradient inversion by the server against one client's update (issue 22, first attack).

    python -m experiments.inversion --dataset digits --out docs/results/inversion/
    python -m experiments.inversion --dataset fashion-mnist --iterations 300 --out ...

Threat model: an honest-but-curious server. It knows the global model x it sent, the
client's training hyperparameters (the run config: lr, momentum, batch size, epochs) and
the ``num-examples`` the reply carries, and it receives the client's update y - x (or,
under SecAgg+, only the weighted sum of the round's updates). It has no other access to
the client's data. Simulation only; nothing in the app imports this module.

The attack (written here; why not ``breaching`` is in docs/privacy.md):

- Inverting Gradients (Geiping, Bauermeister, Droege, Moeller, NeurIPS 2020): dummy
  images x' (Gaussian start) are optimized with Adam so that the update they would
  produce matches the observed one in direction: loss = 1 - cos(u(x'), u_obs) + tv *
  TV(x'), over all parameters concatenated, with the box constraint [-1, 1] (the app's
  pixel scale), optionally signed gradients, the learning rate cut by 10 at 3/8, 5/8
  and 7/8 of the iterations, and restarts (the one with the lowest matching loss kept).
  u(x') is the update the attacker *simulates*: ``simulated_update`` runs the client's
  own local training (plain SGD with its lr, momentum, batch size and epochs; the batches
  in a fixed order, since the dummies are free variables and any assignment of dummies to
  steps is as good as another) differentiably, from x. For one local step this is
  -lr * gradient, and the cosine makes the lr irrelevant; for one epoch of several steps it
  is Geiping's multi-step (federated averaging) case, unrolled.
- Labels. One example: iDLG (Zhao, Mopuri, Bilen, 2020): with cross-entropy, the
  gradient of the last layer's weight row i is (p_i - [i = y]) h with h >= 0 (it follows a
  ReLU), so the true label's row is the only non-positive one: the label is the row with
  the most negative sum of the gradient, i.e. the most positive sum of the update
  (update = -lr * gradient). Several examples (this project's own heuristic, an extension
  of the same observation): the last layer's bias gradient summed over the examples is
  S_c = sum_i (p_ic - [y_i = c]), so the count of label c is n * pbar_c - S_c; the server
  estimates pbar (the model's mean softmax) on its own test split and S from the update,
  S = -n * (bias update) / (lr * w), w = the sum over the K local steps of the momentum
  weights (1 - beta^(K - t + 1)) / (1 - beta) (exact for one step, where w = 1;
  approximate for several, as if every step saw the same mean gradient). Counts are
  rounded to integers summing to n (largest remainders).

Observed updates come from the app's own code: ``fl_app.training.train_local`` (plain
SGD, or Opacus DP-SGD through ``fl_app.privacy.DPSGD``), on a copy of the global model.
The SecAgg+ sum quantizes each weighted update with Flower's own ``quantize`` (the app's
clipping range and 2^22 levels) and sums the integers, as the protocol's result is.

Metrics: PSNR and SSIM on images mapped to [0, 1], each reconstruction matched to a true
image by the assignment that maximizes the total PSNR (``best_match``; Hungarian), and
the label recovery rate (multiset overlap of recovered and true labels, over n).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from fl_app.model import build_model
from fl_app.privacy import DPSGD, DPSettings, noise_for_target
from fl_app.training import train_local
from partitions import (
    DataConfig,
    ImageArrays,
    dataset_info,
    load_client_data,
    load_test_data,
)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "inversion"


# ------------------------------------------------------------------ observed updates
def parameter_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def client_update(model: nn.Module, data: ImageArrays, *, epochs: int = 1, batch_size: int,
                  lr: float, momentum: float = 0.0, seed: int = 0,
                  dp: DPSGD | None = None) -> dict[str, torch.Tensor]:
    """y - x: what the client sends after the app's ``train_local`` on a copy of ``model``."""
    local = copy.deepcopy(model)
    before = parameter_dict(local)
    train_local(local, data, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                seed=seed, dp=dp)
    after = parameter_dict(local)
    return {name: after[name] - before[name] for name in before}


def dp_update(model: nn.Module, data: ImageArrays, *, target_epsilon: float, lr: float,
              max_grad_norm: float = 1.0, delta: float = 1e-5, seed: int = 0,
              ) -> tuple[dict[str, torch.Tensor], float, float]:
    """One DP-SGD step on a client holding exactly ``len(data)`` examples (batch = n, so
    q = 1): Opacus through the app's ``DPSGD``, sigma from the app's ``noise_for_target`` for
    ``target_epsilon`` in this one round. Returns (update, sigma, the accountant's epsilon).
    Seeded randomness, so the run is reproducible; the attack does not use the seed."""
    from opacus.accountants import RDPAccountant

    n = len(data)
    sigma = noise_for_target(target_epsilon, delta, 1.0, 1) if target_epsilon > 0 else 0.0
    accountant = RDPAccountant()
    settings = DPSettings(sigma, max_grad_norm, delta, randomness="seeded",
                          noise_seed=seed + 1, sampler_seed=seed + 2)
    update = client_update(model, data, batch_size=n, lr=lr, dp=DPSGD(settings, accountant))
    spent = float(accountant.get_epsilon(delta)) if sigma > 0 else math.inf
    return update, float(sigma), spent


def secagg_sum(updates: list[dict[str, torch.Tensor]], num_examples: list[int], *,
               clipping_range: float = 8.0, quantization_range: int = 4194304,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """What the server holds after a SecAgg+ round: sum_i (n_i / W) (y_i - x), W = max n_i,
    each client's weighted update clipped and quantized by Flower's ``quantize`` (the
    app's ``secagg-clipping-range`` and ``secagg-quantization-range`` defaults), the
    integers summed and dequantized (the masks cancel in the sum, so they are left out)."""
    from flwr.common.secure_aggregation.quantization import quantize

    np.random.seed(seed)  # Flower's stochastic rounding draws from NumPy's global generator
    names = list(updates[0])
    weight_max = max(num_examples)
    total = {name: np.zeros(updates[0][name].shape, dtype=np.int64) for name in names}
    for update, n in zip(updates, num_examples):
        arrays = [(n / weight_max) * update[name].numpy().astype(np.float64) for name in names]
        for name, q in zip(names, quantize(arrays, clipping_range, quantization_range)):
            total[name] += q.astype(np.int64)
    step = 2 * clipping_range / quantization_range
    m = len(updates)
    return {name: torch.from_numpy(total[name] * step - m * clipping_range).float()
            for name in names}


# ------------------------------------------------------------------ labels
def last_layer(model: nn.Module) -> tuple[str, str]:
    """Names of the weight and bias of the last nn.Linear (the classifier)."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise ValueError("the model has no nn.Linear classifier")
    return f"{linear[-1]}.weight", f"{linear[-1]}.bias"


def idlg_label(last_weight_gradient: torch.Tensor) -> int:
    """iDLG (Zhao et al. 2020): for one example and cross-entropy, the true label's row of
    the last layer's weight gradient is the one with negative entries (p_y - 1 < 0 times
    h >= 0); rows are summed for robustness. Pass a *gradient* (for an update, its
    negative)."""
    return int(torch.argmin(last_weight_gradient.sum(dim=1)))


def momentum_weight(steps: int, momentum: float) -> float:
    """w = sum over t = 1..K of (1 - beta^(K - t + 1)) / (1 - beta): how many 'gradients'
    K steps of SGD with heavy-ball momentum beta move the weights (K for beta = 0)."""
    if momentum == 0:
        return float(steps)
    return sum((1 - momentum ** (steps - t + 1)) / (1 - momentum) for t in range(1, steps + 1))


def label_counts(summed_bias_gradient: torch.Tensor, mean_probs: torch.Tensor, n: int) -> np.ndarray:
    """Label counts from S_c = sum_i (p_ic - [y_i = c]): n * pbar_c - S_c, clipped at 0 and
    rounded to integers summing to n (largest remainders)."""
    raw = np.clip((n * mean_probs - summed_bias_gradient).double().numpy(), 0.0, None)
    if raw.sum() > 0:
        raw = raw * (n / raw.sum())
    counts = np.floor(raw).astype(int)
    for c in np.argsort(-(raw - counts))[: n - counts.sum()]:
        counts[c] += 1
    return counts


def recover_labels(model: nn.Module, update: dict[str, torch.Tensor], *, n: int, lr: float,
                   steps: int = 1, momentum: float = 0.0,
                   mean_probs: torch.Tensor | None = None) -> torch.Tensor:
    """The labels the attacker gives its dummies (sorted): iDLG for n = 1, else the counts
    from the bias (``label_counts``; ``mean_probs`` from the server's own data)."""
    weight, bias = last_layer(model)
    if n == 1:
        return torch.tensor([idlg_label(-update[weight])])
    if mean_probs is None:
        raise ValueError("several examples need the model's mean softmax (mean_probs)")
    summed = -n * update[bias] / (lr * momentum_weight(steps, momentum))
    counts = label_counts(summed, mean_probs, n)
    return torch.tensor(np.repeat(np.arange(len(counts)), counts), dtype=torch.long)


@torch.no_grad()
def mean_softmax(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    """pbar: the model's mean softmax on the server's own images (``model`` left as it was)."""
    return torch.softmax(copy.deepcopy(model).eval()(torch.from_numpy(x)), dim=1).mean(0)


def label_recovery_rate(recovered, true) -> float:
    """Multiset overlap of recovered and true labels, over the number of true labels."""
    r, t = np.bincount(np.asarray(recovered), minlength=100), np.bincount(np.asarray(true), minlength=100)
    return float(np.minimum(r, t).sum() / len(np.asarray(true)))


# ------------------------------------------------------------------ the attack
def simulated_update(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                     y: torch.Tensor, *, lr: float, momentum: float = 0.0,
                     batch_size: int | None = None, epochs: int = 1) -> list[torch.Tensor]:
    """The update plain SGD (torch's, with heavy-ball momentum) would make from ``params``
    on (x, y), differentiable in x: batches of ``batch_size`` in the given order."""
    criterion = nn.CrossEntropyLoss()
    current = dict(params)
    names = list(current)
    buffers: dict[str, torch.Tensor] = {}
    batch_size = batch_size or len(y)
    for _ in range(epochs):
        for start in range(0, len(y), batch_size):
            logits = functional_call(model, current, (x[start:start + batch_size],))
            loss = criterion(logits, y[start:start + batch_size])
            grads = torch.autograd.grad(loss, [current[k] for k in names], create_graph=True)
            for name, g in zip(names, grads):
                if momentum:
                    g = g if name not in buffers else momentum * buffers[name] + g
                    buffers[name] = g
                current[name] = current[name] - lr * g
    return [current[k] - params[k] for k in names]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (both directions)."""
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean()
            + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())


@dataclass
class AttackConfig:
    iterations: int = 400
    lr: float = 0.3  # Adam's (Geiping et al. use 0.1; 0.3 did better on 8x8 digits)
    tv: float = 1e-4
    signed: bool = True
    restarts: int = 1
    seed: int = 0
    init: str = "randn"  # "randn" (Geiping et al.) or "zeros" (mid-grey)


@dataclass
class Reconstruction:
    images: torch.Tensor  # (n, C, H, W) in [-1, 1]
    labels: torch.Tensor
    loss: float  # the final matching loss (1 - cosine) of the kept restart
    seconds: float


def invert(model: nn.Module, observed: dict[str, torch.Tensor], labels: torch.Tensor, *,
           image_shape: tuple[int, int, int], lr: float, momentum: float = 0.0,
           batch_size: int | None = None, epochs: int = 1,
           config: AttackConfig | None = None) -> Reconstruction:
    """Inverting Gradients against ``observed`` (y - x, or a sum of them), with dummies of
    the given ``labels``; the client's local training is simulated (``simulated_update``)."""
    started = time.perf_counter()
    config = config or AttackConfig()
    model = copy.deepcopy(model).train()
    for p in model.parameters():
        p.requires_grad_(False)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    target = torch.cat([observed[k].flatten() for k in params]).detach()
    target = target / target.norm()
    n = len(labels)
    generator = torch.Generator().manual_seed(config.seed)
    best: tuple[float, torch.Tensor] | None = None
    milestones = [int(config.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    for _ in range(config.restarts):
        x = torch.randn((n, *image_shape), generator=generator)
        if config.init == "zeros":
            x = x * 0
        x = x.clamp_(-1, 1).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=config.lr)
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)

        def matching_loss(x: torch.Tensor) -> torch.Tensor:
            u = torch.cat([t.flatten() for t in simulated_update(
                model, params, x, labels, lr=lr, momentum=momentum, batch_size=batch_size,
                epochs=epochs)])
            return 1 - torch.dot(u, target) / (u.norm() + 1e-12)

        for _ in range(config.iterations):
            optimizer.zero_grad()
            loss = matching_loss(x) + config.tv * total_variation(x)
            (grad,) = torch.autograd.grad(loss, [x])
            x.grad = grad.sign() if config.signed else grad
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                x.clamp_(-1, 1)
        final = float(matching_loss(x).detach())
        if best is None or final < best[0]:
            best = (final, x.detach().clone())
    return Reconstruction(best[1], labels.clone(), best[0], time.perf_counter() - started)


# ------------------------------------------------------------------ metrics
def to_unit(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """App scale [-1, 1] -> [0, 1], float64, (n, C, H, W)."""
    a = x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.clip((a.astype(np.float64) + 1) / 2, 0, 1)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """10 log10(1 / MSE) for images in [0, 1] (capped at 100 dB for identical images)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 100.0 if mse <= 1e-10 else 10 * math.log10(1.0 / mse)


def ssim(a: np.ndarray, b: np.ndarray, win: int = 7) -> float:
    """SSIM (Wang, Bovik, Sheikh, Simoncelli, IEEE TIP 2004) of two (C, H, W) images in
    [0, 1], as scikit-image's ``structural_similarity`` computes it by default (a uniform
    win x win window, sample covariances, K1 = 0.01, K2 = 0.03, data range 1, the mean over
    the windows wholly inside the image and over channels). scikit-image is not a project
    dependency; docs/privacy.md says how this was checked against it."""
    x = torch.as_tensor(np.asarray(a, np.float64))
    y = torch.as_tensor(np.asarray(b, np.float64))
    x, y = x.reshape(-1, 1, *x.shape[-2:]), y.reshape(-1, 1, *y.shape[-2:])
    win = min(win, x.shape[-1], x.shape[-2])
    mean = lambda t: torch.nn.functional.avg_pool2d(t, win, stride=1)
    np_ = win * win
    cov = np_ / (np_ - 1)
    ux, uy = mean(x), mean(y)
    vx, vy = cov * (mean(x * x) - ux * ux), cov * (mean(y * y) - uy * uy)
    vxy = cov * (mean(x * y) - ux * uy)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def best_match(reconstructed: np.ndarray, true: np.ndarray) -> np.ndarray:
    """perm such that reconstructed[perm[i]] is matched to true[i], maximizing total PSNR."""
    from scipy.optimize import linear_sum_assignment

    r = np.asarray(reconstructed, np.float64).reshape(len(reconstructed), -1)
    t = np.asarray(true, np.float64).reshape(len(true), -1)
    mse = ((t[:, None, :] - r[None, :, :]) ** 2).mean(-1)
    scores = 10 * np.log10(1.0 / np.maximum(mse, 1e-10))
    rows, cols = linear_sum_assignment(-scores)
    return cols[np.argsort(rows)]


def score(reconstruction: Reconstruction, true_x: np.ndarray, true_y: np.ndarray) -> dict:
    rec, tru = to_unit(reconstruction.images), to_unit(true_x)
    perm = best_match(rec, tru)
    p = [psnr(rec[perm[i]], tru[i]) for i in range(len(tru))]
    s = [ssim(rec[perm[i]], tru[i]) for i in range(len(tru))]
    return {"psnr": p, "ssim": s, "perm": perm.tolist(),
            "label_recovery": label_recovery_rate(reconstruction.labels.numpy(), true_y),
            "labels_recovered": reconstruction.labels.tolist(), "labels_true": list(map(int, true_y)),
            "matching_loss": reconstruction.loss, "seconds": reconstruction.seconds}


# ------------------------------------------------------------------ the cases
@dataclass
class Setting:
    """The client's training as the server knows it (the app's run-config defaults)."""

    dataset: str = "digits"
    model: str = "cnn"
    model_seed: int = 0  # the round-1 global model: build_model(info, seed)
    partition: int = 0  # the attacked client: partition 0 of 10, IID, seed 0
    num_partitions: int = 10
    partitioner: str = "iid"  # or "dirichlet" (alpha below): a client with skewed labels
    alpha: float = 0.5
    lr: float = 0.05
    momentum: float = 0.9  # the app's default; irrelevant for one step (the first buffer is g)
    batch_size: int = 32
    images: int = 8  # images 0..7 of the client's training data, in every one-step case
    dp_epsilons: tuple = (8.0, 1.0)
    dp_delta: float = 1e-5
    dp_max_grad_norm: float = 1.0
    secagg_clients: int = 4
    attack: AttackConfig = field(default_factory=AttackConfig)


def _summary(scores: list[dict]) -> dict:
    p = [v for s in scores for v in s["psnr"]]
    q = [v for s in scores for v in s["ssim"]]
    n = [len(s["labels_true"]) for s in scores]
    return {"images": len(p), "attacks": len(scores),
            "psnr_mean": float(np.mean(p)), "psnr_std": float(np.std(p)),
            "psnr_median": float(np.median(p)), "psnr_min": float(np.min(p)),
            "psnr_max": float(np.max(p)), "ssim_mean": float(np.mean(q)),
            "ssim_std": float(np.std(q)),
            "label_recovery": float(np.average([s["label_recovery"] for s in scores], weights=n)),
            "seconds": float(sum(s["seconds"] for s in scores))}


def run_cases(setting: Setting, cases: list[str] | None = None, log=print) -> dict:
    """Every case against the same client and global model; returns the record (and, under
    "arrays", the reconstructions of images 0..images-1 for the figure)."""
    torch.manual_seed(setting.attack.seed)
    info = dataset_info(setting.dataset)
    shape = tuple(info.image_shape)
    model = build_model(info, setting.model_seed, kind=setting.model)
    cfg = DataConfig(setting.dataset, setting.partitioner, setting.alpha, 2, 2, 0.1, 0)
    client = load_client_data(cfg, setting.partition, setting.num_partitions).train
    test_x = load_test_data(setting.dataset).x
    probs = mean_softmax(model, test_x)
    k, lr, attack = setting.images, setting.lr, setting.attack
    xs, ys = client.x[:k], client.y[:k]
    arrays: dict[str, np.ndarray] = {"true": to_unit(xs)}
    record: dict = {}

    def one_step(batch: int, make_update, label: str, note: str, extra: dict | None = None):
        scores, images = [], np.zeros_like(arrays["true"])
        for start in range(0, k, batch):
            data = ImageArrays(xs[start:start + batch], ys[start:start + batch])
            update, info_extra = make_update(data, start)
            labels = recover_labels(model, update, n=batch, lr=lr, mean_probs=probs)
            rec = invert(model, update, labels, image_shape=shape, lr=lr,
                         config=AttackConfig(**{**asdict(attack), "seed": attack.seed + start}))
            s = score(rec, data.x, data.y)
            scores.append({**s, **info_extra})
            images[start:start + batch] = to_unit(rec.images)[s["perm"]]
        arrays[label] = images
        record[label] = {"note": note, **(extra or {}), **_summary(scores), "per_attack": scores}
        log(f"{label}: PSNR {record[label]['psnr_mean']:.1f} dB, SSIM {record[label]['ssim_mean']:.2f}, "
            f"labels {record[label]['label_recovery']:.2f} ({record[label]['seconds']:.0f} s)")

    plain = lambda data, start: (client_update(model, data, batch_size=len(data), lr=lr), {})
    wanted = set(cases or case_names(setting.dp_epsilons))
    for batch in (1, 4, 8):
        if f"plain-b{batch}" in wanted and k % batch == 0:
            one_step(batch, plain, f"plain-b{batch}",
                     f"plain FedAvg update, one local SGD step on a batch of {batch}")
    for eps in (0.0, *setting.dp_epsilons):
        label = "dp-clip-only" if eps == 0 else f"dp-eps{eps:g}"
        if label not in wanted:
            continue

        def private(data, start, eps=eps):
            update, sigma, spent = dp_update(model, data, target_epsilon=eps, lr=lr,
                                             max_grad_norm=setting.dp_max_grad_norm,
                                             delta=setting.dp_delta, seed=start)
            return update, {"sigma": sigma, "epsilon": spent}

        sigma = noise_for_target(eps, setting.dp_delta, 1.0, 1) if eps > 0 else 0.0
        one_step(1, private, label,
                 "DP-SGD (Opacus via fl_app.privacy), one step on a batch of 1 (q = 1), "
                 + ("clipping only, no noise" if eps == 0 else f"epsilon {eps:g} for the round"),
                 {"sigma": sigma, "max_grad_norm": setting.dp_max_grad_norm,
                  "delta": setting.dp_delta, "target_epsilon": eps or None})
    m = setting.secagg_clients
    if "secagg" in wanted and k % m == 0:
        def summed(data, start):
            updates = [client_update(model, ImageArrays(data.x[i:i + 1], data.y[i:i + 1]),
                                     batch_size=1, lr=lr) for i in range(len(data))]
            total = secagg_sum(updates, [1] * len(data), seed=start)
            # the weighted mean the server computes from it (sum * W / sum of n_i, W = 1 here)
            return {name: v / len(data) for name, v in total.items()}, {}

        one_step(m, summed, "secagg",
                 f"SecAgg+ round: the quantized sum of {m} clients' one-step updates (batch 1 each), "
                 f"attacked as one batch of {m}")
    def default_epoch(label: str, target_epsilon: float = 0.0) -> None:
        """The app's default round (one epoch of batches), plain or under DP-SGD at
        ``target_epsilon`` for the round (Poisson batches of expected size batch_size,
        sigma from the app's noise_for_target, seeded); the attacker unrolls the plain
        epoch it would expect (it cannot know the Poisson batches) and counts labels."""
        from opacus.accountants import RDPAccountant

        n = len(client)
        steps = math.ceil(n / setting.batch_size)
        dp, extra = None, {}
        if target_epsilon > 0:
            from fl_app.privacy import sample_rate

            q = sample_rate(n, setting.batch_size)
            sigma = noise_for_target(target_epsilon, setting.dp_delta, q, steps)
            accountant = RDPAccountant()
            dp = DPSGD(DPSettings(sigma, setting.dp_max_grad_norm, setting.dp_delta,
                                  randomness="seeded", noise_seed=11, sampler_seed=12),
                       accountant)
        update = client_update(model, client, epochs=1, batch_size=setting.batch_size, lr=lr,
                               momentum=setting.momentum, seed=0, dp=dp)
        if dp is not None:
            extra = {"sigma": sigma, "sample_rate": q, "max_grad_norm": setting.dp_max_grad_norm,
                     "delta": setting.dp_delta, "target_epsilon": target_epsilon,
                     "epsilon": float(accountant.get_epsilon(setting.dp_delta))}
        labels = recover_labels(model, update, n=n, lr=lr, steps=steps,
                                momentum=setting.momentum, mean_probs=probs)
        labels = labels[torch.randperm(n, generator=torch.Generator().manual_seed(attack.seed))]
        rec = invert(model, update, labels, image_shape=shape, lr=lr, momentum=setting.momentum,
                     batch_size=setting.batch_size, epochs=1, config=attack)
        s = score(rec, client.x, client.y)
        arrays[label] = to_unit(rec.images)[s["perm"][:k]]
        how = (f"DP-SGD at epsilon {target_epsilon:g} for the round (Poisson batches, q = "
               f"{extra['sample_rate']:.3g}, sigma {extra['sigma']:.3g}, C "
               f"{setting.dp_max_grad_norm:g})" if dp is not None else "plain SGD")
        record[label] = {
            "note": (f"the app's default round: one epoch of train_local over the client's {n} "
                     f"examples (batch {setting.batch_size}, lr {lr}, momentum {setting.momentum}, "
                     f"{steps} steps), {how}, attacked by unrolling {steps} plain steps on {n} "
                     "dummies"),
            "num_examples": n, "steps": steps, **extra, **_summary([s]), "per_attack": [s]}
        log(f"{label}: PSNR {record[label]['psnr_mean']:.1f} dB, SSIM "
            f"{record[label]['ssim_mean']:.2f}, labels "
            f"{record[label]['label_recovery']:.2f} ({s['seconds']:.0f} s)")

    if "default-epoch" in wanted:
        default_epoch("default-epoch")
    for eps in setting.dp_epsilons:
        if f"default-epoch-dp{eps:g}" in wanted:
            default_epoch(f"default-epoch-dp{eps:g}", eps)
    # what the server guesses of the labels with no update at all: the counts n * (its
    # model's mean softmax on its own test split), the label attack's prior; on an IID
    # client this alone recovers most labels, so the attack's rate is read against it
    n_all = len(client)
    guess = label_counts(torch.zeros(info.num_classes), probs, n_all)
    record["prior-label-counts"] = {
        "note": "no attack: the label counts n * mean softmax of the global model on the "
                "server's test split, scored like a recovery",
        "num_examples": n_all,
        "label_recovery": label_recovery_rate(np.repeat(np.arange(len(guess)), guess), client.y)}
    # the level of no leak at all: the server's own mean image, scored like a reconstruction
    prior = np.repeat(to_unit(test_x).mean(0, keepdims=True), k, axis=0)
    record["prior-mean-image"] = {
        "note": "no attack: the mean image of the server's test split, scored against the true images",
        "psnr_mean": float(np.mean([psnr(prior[i], arrays["true"][i]) for i in range(k)])),
        "ssim_mean": float(np.mean([ssim(prior[i], arrays["true"][i]) for i in range(k)])),
        "images": k}
    return {"cases": record, "arrays": arrays}


CASES = ("plain-b1", "plain-b4", "plain-b8", "secagg", "dp-clip-only", "dp-eps8", "dp-eps1",
         "default-epoch", "default-epoch-dp8", "default-epoch-dp1")


def case_names(dp_epsilons) -> list[str]:
    """Every case a run with these DP epsilons can attack, in table and figure order: the
    one-step cases (plain, SecAgg+, clipping only, DP by decreasing epsilon), then the
    default round (plain, then DP by decreasing epsilon)."""
    eps = sorted({float(e) for e in dp_epsilons}, reverse=True)
    return (["plain-b1", "plain-b4", "plain-b8", "secagg", "dp-clip-only"]
            + [f"dp-eps{e:g}" for e in eps] + ["default-epoch"]
            + [f"default-epoch-dp{e:g}" for e in eps])


def _ordered(keys) -> list[str]:
    """``keys`` (case names) in ``case_names`` order, for whatever epsilons they name."""
    eps = [float(k.removeprefix("default-epoch-dp")) for k in keys if k.startswith("default-epoch-dp")]
    eps += [float(k.removeprefix("dp-eps")) for k in keys if k.startswith("dp-eps")]
    return [k for k in case_names(eps) if k in keys]
ROW_TITLES = {"true": "true", "plain-b1": "plain, batch 1", "plain-b4": "plain, batch 4",
              "plain-b8": "plain, batch 8", "secagg": "SecAgg+ sum of 4",
              "dp-clip-only": "DP clip only", "dp-eps8": "DP eps 8", "dp-eps1": "DP eps 1",
              "default-epoch": "plain, 1 epoch", "default-epoch-dp8": "DP eps 8, 1 epoch",
              "default-epoch-dp1": "DP eps 1, 1 epoch"}


# the records docs/privacy.md shows, one table each, in this order
TABLE_RECORDS = ("digits-cnn", "digits-mlp", "fashion-mnist-cnn", "digits-cnn-2000it",
                 "digits-cnn-dp-curve")


def _case_title(key: str, case: dict, setting: dict) -> str:
    if key == "prior-mean-image":
        return "no attack: the server's mean test image"
    if key.startswith("plain-b"):
        return f"plain, one step, batch {key.removeprefix('plain-b')}"
    if key == "secagg":
        return f"SecAgg+, {setting['secagg_clients']} clients x one image, one step"
    if key == "dp-clip-only":
        return "DP-SGD clipping only (sigma 0), batch 1"
    if key.startswith("dp-eps"):
        return f"DP-SGD epsilon {case['target_epsilon']:g} (sigma {case['sigma']:.3g}), batch 1"
    default = (f"the app's default round: 1 epoch, batch {setting['batch_size']}, momentum "
               f"{setting['momentum']:g} ({case['steps']} steps)")
    if key == "default-epoch":
        return default
    return (f"{default}, DP-SGD epsilon {case['target_epsilon']:g} (sigma {case['sigma']:.3g}, "
            f"q = {case['sample_rate']:.3g})")


def _labels(case: dict, n: int) -> str:
    """Labels recovered out of n, and how: iDLG for one example an attack, else counts."""
    how = "iDLG" if case["images"] == case["attacks"] else "counts"
    return f"{round(case['label_recovery'] * n)} / {n} ({how})"


def case_table(record: dict) -> str:
    """One record's cases: the server's mean test image (the level of no leak), then each
    attacked case in CASES order, with the mean, sd and range of PSNR over the true images,
    the mean SSIM and the labels recovered."""
    setting, cases = record["setting"], record["cases"]
    lines = ["| case | the server holds | images (attacks) | PSNR dB, mean ± sd [min, max] | "
             "SSIM mean | labels recovered |", "|---|---|---|---|---|---|"]
    prior = cases.get("prior-mean-image")
    if prior:
        lines.append(f"| {_case_title('prior-mean-image', prior, setting)} | – | {prior['images']} | "
                     f"{prior['psnr_mean']:.1f} | {prior['ssim_mean']:.3f} | – |")
    for key in _ordered(cases):
        c = cases[key]
        holds = "the quantized sum" if key == "secagg" else "y - x"
        lines.append(
            f"| {_case_title(key, c, setting)} | {holds} | {c['images']} ({c['attacks']}) | "
            f"{c['psnr_mean']:.1f} ± {c['psnr_std']:.1f} [{c['psnr_min']:.1f}, {c['psnr_max']:.1f}] | "
            f"{c['ssim_mean']:.3f} | {_labels(c, c['images'])} |")
    return "\n".join(lines) + "\n"


def label_table(records: dict[str, dict]) -> str:
    """The default round's label recovery against the server's prior (no update), plain
    and under DP-SGD, one row per client record (``digits-cnn-default-dp*``)."""
    lines = ["| client | prior alone (no update) | plain round | DP, epsilon 8 | DP, epsilon 1 |",
             "|---|---|---|---|---|"]
    for stem, record in records.items():
        s, c = record["setting"], record["cases"]
        split = ("IID" if s.get("partitioner", "iid") == "iid"
                 else f"Dir({s.get('alpha'):g})")
        cells = [f"{split}, {c['prior-label-counts']['num_examples']} examples",
                 f"{100 * c['prior-label-counts']['label_recovery']:.1f} %"]
        for key in ("default-epoch", "default-epoch-dp8", "default-epoch-dp1"):
            k = c[key]
            sigma = f", sigma {k['sigma']:.3g}" if "sigma" in k else ""
            cells.append(f"{100 * k['label_recovery']:.1f} % ({k['psnr_mean']:.1f} dB{sigma})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_table(out: Path) -> str:
    """table.md from the records in ``out``: one table per record of TABLE_RECORDS (those
    present, in order), then the default round's labels (``digits-cnn-default-dp*.json``); what ``--table-only``
    writes and ``experiments.docs_check`` checks."""
    out = Path(out)
    parts = ["Gradient inversion by the server (experiments/inversion.py): per record, each "
             "case's reconstructions of the true images (PSNR and SSIM against them, the "
             "reconstructions matched to the images), and the labels the attack recovered.\n"]
    for stem in TABLE_RECORDS:
        path = out / f"{stem}.json"
        if path.exists():
            record = json.loads(path.read_text())
            s, a = record["setting"], record["setting"]["attack"]
            parts.append(f"`{stem}.json`: {s['dataset']}, {s['model']}, partition "
                         f"{s['partition']} of {s['num_partitions']}, images 0-{s['images'] - 1}, "
                         f"{a['iterations']} iterations.\n\n" + case_table(record))
    labels = {p.stem: json.loads(p.read_text())  # the IID client first, then the skewed
              for p in sorted(out.glob("digits-cnn-default-dp*.json"), key=lambda p: (len(p.stem), p.stem))}
    if labels:
        parts.append("The default round's labels against the server's prior (`"
                     + "`, `".join(f"{k}.json" for k in labels) + "`): label recovery, and in "
                     "brackets the reconstructions' mean PSNR.\n\n" + label_table(labels))
    return "\n".join(parts)


def plot(arrays: dict[str, np.ndarray], record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["true", *_ordered([r for r in arrays if r != "true"])]
    k = len(arrays["true"])
    fig, axes = plt.subplots(len(rows), k, figsize=(1.1 * k + 1.6, 1.15 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(k):
            ax = axes[i][j]
            img = arrays[row][j]
            ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray",
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row != "true" and row in record:
                per = [p for a in record[row]["per_attack"] for p in a["psnr"]]
                if not row.startswith("default-epoch"):
                    ax.set_title(f"{per[j]:.0f} dB", fontsize=7, pad=2)
        title = ROW_TITLES.get(row) or (f"DP eps {row.removeprefix('dp-eps')}" if row.startswith("dp-eps")
                                        else f"DP eps {row.removeprefix('default-epoch-dp')}, 1 epoch")
        if row in record:
            title += f"\n{record[row]['psnr_mean']:.1f} dB"
        axes[i][0].set_ylabel(title, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="cnn", choices=["cnn", "mlp"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--iterations", type=int, default=AttackConfig.iterations)
    parser.add_argument("--restarts", type=int, default=AttackConfig.restarts)
    parser.add_argument("--tv", type=float, default=AttackConfig.tv)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dp-epsilons", nargs="+", type=float, default=list(Setting.dp_epsilons),
                        help="the DP cases' epsilons for the round (dp-eps<e>, default-epoch-dp<e>)")
    parser.add_argument("--cases", nargs="+", default=None,
                        help="the cases to attack (default: all of --dp-epsilons'): "
                             + ", ".join(case_names(Setting.dp_epsilons)) + "; dp-eps<e> and "
                             "default-epoch-dp<e> for each e of --dp-epsilons")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--partitioner", default="iid", choices=["iid", "dirichlet"],
                        help="how the attacked client's data was split (dirichlet: --alpha)")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--name", default="", help="file stem (default: DATASET-MODEL)")
    parser.add_argument("--table-only", action="store_true",
                        help="attack nothing: rebuild table.md from the records in --out")
    args = parser.parse_args(argv)
    if args.table_only:
        (args.out / "table.md").write_text(build_table(args.out))
        print(f"wrote {args.out / 'table.md'}")
        return 0
    known = case_names(args.dp_epsilons)
    cases = args.cases or known
    unknown = [c for c in cases if c not in known]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)} for --dp-epsilons "
                     f"{' '.join(f'{e:g}' for e in args.dp_epsilons)}; accepted: {', '.join(known)}")
    torch.set_num_threads(args.threads)
    attack = AttackConfig(iterations=args.iterations, restarts=args.restarts, tv=args.tv,
                          seed=args.seed)
    setting = Setting(dataset=args.dataset, model=args.model, attack=attack,
                      partitioner=args.partitioner, alpha=args.alpha,
                      dp_epsilons=tuple(args.dp_epsilons))
    started, cpu = time.perf_counter(), time.process_time()
    result = run_cases(setting, cases)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{args.dataset}-{args.model}"
    record = {
        "command": " ".join(["python -m experiments.inversion",
                             *(argv if argv is not None else sys.argv[1:])]),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "setting": {**asdict(setting), "dp_epsilons": list(setting.dp_epsilons)},
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": args.threads, "wall_seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu, "cases": result["cases"],
    }
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    np.savez_compressed(args.out / f"{stem}.npz", **result["arrays"])
    plot(result["arrays"], result["cases"], args.out / f"{stem}.png")
    (args.out / "table.md").write_text(build_table(args.out))
    print(f"wrote {args.out / stem}.json/.npz/.png ({record['wall_seconds']:.0f} s wall, "
          f"{record['cpu_seconds']:.0f} s CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
