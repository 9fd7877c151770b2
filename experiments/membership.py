"""Membership inference against models trained by the app's own code, without and with
DP-SGD (issue 22, second attack).

    python -m experiments.membership --out docs/results/membership/
    python -m experiments.membership --configs nodp --models 8 --pool 400
    python -m experiments.membership --configs fed-nodp fed-dp-eps8 fed-dp-eps1
    python -m experiments.membership --configs user-nodp user-dp-eps8 user-dp-eps1

Setup (Carlini, Chien, Nasr, Song, Terzis, Tramer, "Membership Inference Attacks From First
Principles", IEEE S&P 2022, its evaluation protocol): M models are trained, each on an
independent random half of a pool of examples (each example in with probability 1/2, the
masks from ``seed``). Each model in turn is the target and the other M - 1 are the
attacker's shadow models (leave-one-out), so every (model, example) pair is one trial with
a known answer: M x pool trials, half members. Every model is trained by
``fl_app.training.train_local`` (plain SGD, or Opacus DP-SGD through ``fl_app.privacy.DPSGD``
with sigma from the app's ``noise_for_target`` for the run's steps and sample rate), i.e.
as one client trains its local model; the attacker sees the trained model's outputs.

Federated (``clients`` > 1, the ``fed-*`` configurations): each of the M trainings is a
FedAvg federation whose client 0 holds the model's random half of the pool and whose other
clients hold fixed data outside it; every client trains ``epochs`` local epochs a round
with ``train_local`` from the global model, the server takes the example-weighted mean,
for ``rounds`` rounds (DP-SGD on every client, epsilon spent over all the rounds). Two
targets are attacked, each with the same leave-one-out shadows: the final global model
(what anyone who receives the model sees, and all that a SecAgg+ server sees of client 0)
and client 0's model after its last local training, i.e. the last global model plus
client 0's update (what a plain FedAvg server receives).

User-level (``users`` > 0, the ``user-*`` configurations): client membership, the relation
user-level DP protects. ``users`` disjoint users of ``per_user`` examples each; each of the
M trainings is a federation of exactly half of them (its mask), all sampled every round,
each trained by ``train_local`` from the global model; the server takes the uniform mean
of the updates or, with a target epsilon, the app's DP-FedAvg release
(``strategies.user_dp.UserLevelDP.release``: re-clip to C, uniform mean, Gaussian noise of
std sigma C / m, sigma from ``user_noise`` for ``rounds`` releases). A user's statistic on
a model is the mean over its examples of phi (LiRA) or of -loss; the target is the final
global model; the trials are (training, user) pairs, the shadows the other trainings.

Attacks (written here; docs/privacy.md says what was looked at first):

- **loss threshold** (Yeom, Giacomelli, Fredrikson, Jha, "Privacy Risk in Machine
  Learning: Analyzing the Connection to Overfitting", IEEE CSF 2018): score = -loss of
  the target model on the example (ranked through phi below, which orders the examples
  exactly as -loss = -softplus(-phi) does but does not underflow); no shadow models.
- **LiRA** (Carlini et al. 2022): the logit-scaled confidence phi = log(p_y / (1 - p_y))
  of the target model on (x, y), compared with the same statistic of the shadow models
  that did not train on the example (offline: score = (phi - mu_out) / sigma_out, one-sided)
  and, online, also of those that did (score = log N(phi; mu_in, sigma_in^2) - log N(phi;
  mu_out, sigma_out^2)). With few shadow models the variance is global (one sigma_in and
  one sigma_out over all examples), as the paper recommends for small numbers of shadows;
  the means are per example. No augmentation queries.

Metrics: ROC-AUC with a bootstrap 95% interval (resampling the pooled trials; the trials of
one model share it, so the interval is somewhat optimistic), and TPR at FPR 1e-3 and 1e-2
(the threshold at the largest score whose false positives stay within the rate), with the
TPR's two-sided 95% Clopper-Pearson interval given that threshold (the threshold is chosen
on the same trials: the interval ignores that choice). Scores tied at the threshold are all
left out, so ties can only lower the TPR reported.

Simulation only; nothing in the app imports this module.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from scipy.stats import beta as beta_dist
from torch import nn

from fl_app.model import build_model
from fl_app.privacy import DPSGD, DPSettings, noise_for_target, sample_rate, steps_per_epoch

# Opacus's per-sample gradient mode: the app's default unless a configuration names one
APP_GRAD_SAMPLE_MODE = DPSettings.__dataclass_fields__["grad_sample_mode"].default
from fl_app.training import evaluate, train_local
from partitions import DataConfig, ImageArrays, load_client_data, load_test_data

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "membership"
FPRS = (1e-3, 1e-2)


# ------------------------------------------------------------------ metrics
def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counting 1/2
    (the Mann-Whitney statistic: the area under the ROC curve)."""
    from scipy.stats import rankdata

    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    ranks = rankdata(scores)
    n1, n0 = int(labels.sum()), int((~labels).sum())
    return float((ranks[labels].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float) -> dict:
    """The rule 'member iff score >= t' with the lowest t whose false-positive rate is at
    most ``fpr``; its TPR, FPR and the TPR's two-sided 95% Clopper-Pearson interval."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    neg = np.sort(scores[~labels])[::-1]  # non-members, highest first
    allowed = int(math.floor(fpr * len(neg) + 1e-9))  # false positives allowed
    # t just above the (allowed + 1)-th highest non-member score: exactly `allowed` of them
    # are at or above it (fewer if tied)
    t = np.nextafter(neg[allowed], np.inf) if allowed < len(neg) else -np.inf
    pos = scores[labels]
    tp, fp = int((pos >= t).sum()), int((neg >= t).sum())
    n = len(pos)
    lo = 0.0 if tp == 0 else float(beta_dist.ppf(0.025, tp, n - tp + 1))
    hi = 1.0 if tp == n else float(beta_dist.ppf(0.975, tp + 1, n - tp))
    return {"fpr_target": fpr, "threshold": float(t), "tpr": tp / n, "fpr": fp / len(neg),
            "true_positives": tp, "false_positives": fp, "members": n,
            "non_members": len(neg), "tpr_ci95": [lo, hi]}


def bootstrap_auc(scores, labels, reps: int = 200, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    values = []
    for _ in range(reps):
        idx = rng.integers(0, len(scores), len(scores))
        if labels[idx].all() or not labels[idx].any():
            continue
        values.append(roc_auc(scores[idx], labels[idx]))
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def summarize(scores, labels, seed: int = 0) -> dict:
    return {"auc": roc_auc(scores, labels), "auc_ci95": bootstrap_auc(scores, labels, seed=seed),
            **{f"tpr_at_fpr_{f:g}": tpr_at_fpr(scores, labels, f) for f in FPRS}}


# ------------------------------------------------------------------ attacks
def logit_confidence(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """phi = log(p_y / (1 - p_y)), computed stably as logit_y - logsumexp(other logits)."""
    logits = logits.double()
    own = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.clone()
    others.scatter_(1, y[:, None], -math.inf)
    return (own - torch.logsumexp(others, dim=1)).numpy()


@torch.no_grad()
def outputs(model: nn.Module, data: ImageArrays) -> tuple[np.ndarray, np.ndarray]:
    """(per-example cross-entropy loss, logit-scaled confidence) of ``model`` on ``data``."""
    model.eval()
    logits = model(torch.from_numpy(data.x))
    y = torch.from_numpy(data.y)
    loss = nn.functional.cross_entropy(logits.double(), y, reduction="none").numpy()
    return loss, logit_confidence(logits, y)


def lira_scores(conf: np.ndarray, masks: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    """(offline, online) LiRA scores of model ``target`` on every example: conf and masks
    are (models, examples); the shadows are every other model. Per-example means, global
    standard deviations; an example without any OUT (IN) shadow gets the global mean."""
    shadows = np.array([m for m in range(len(conf)) if m != target])
    c, inside = conf[shadows], masks[shadows].astype(bool)

    def stats(which: np.ndarray):
        count = which.sum(0)
        total = np.where(which, c, 0.0).sum(0)
        global_mean = c[which].mean()
        mean = np.where(count > 0, total / np.maximum(count, 1), global_mean)
        resid = np.where(which, c - mean[None, :], 0.0)
        std = math.sqrt((resid ** 2).sum() / max(which.sum() - 1, 1))
        return mean, max(std, 1e-6)

    mu_out, sd_out = stats(~inside)
    mu_in, sd_in = stats(inside)
    phi = conf[target]
    offline = (phi - mu_out) / sd_out
    log_in = -0.5 * ((phi - mu_in) / sd_in) ** 2 - math.log(sd_in)
    log_out = -0.5 * ((phi - mu_out) / sd_out) ** 2 - math.log(sd_out)
    return offline, log_in - log_out


# ------------------------------------------------------------------ the experiment
@dataclass
class MIConfig:
    name: str
    target_epsilon: float = 0.0  # 0: no DP (plain SGD)
    models: int = 16
    pool: int = 1000  # examples drawn from digits' training split
    model: str = "mlp"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    seed: int = 0
    grad_sample_mode: str = APP_GRAD_SAMPLE_MODE
    # federated (clients > 1): the target is client 0 of a FedAvg federation; ``epochs``
    # local epochs per round, ``rounds`` rounds, the other clients' data fixed
    clients: int = 1
    rounds: int = 1
    # user-level (users > 0, the ``user-*`` configurations): client membership. ``users``
    # candidate users of ``per_user`` examples each; every training is a federation of a
    # random half of them, all sampled every round, under DP-FedAvg's mechanism when the
    # config has a target epsilon (sigma for ``rounds`` releases, C = max_grad_norm)
    users: int = 0
    per_user: int = 15

    @property
    def federated(self) -> bool:
        return self.clients > 1

    @property
    def user_level(self) -> bool:
        return self.users > 0


def digits_examples() -> ImageArrays:
    """Every example of digits' training split (one partition: train and validation)."""
    data = load_client_data(DataConfig("digits", "iid", 0.5, 2, 2, 0.1, 0), 0, 1)
    return ImageArrays(np.concatenate([data.train.x, data.val.x]),
                       np.concatenate([data.train.y, data.val.y]))


def load_pool(size: int, seed: int, others: int = 0) -> tuple[ImageArrays, ImageArrays]:
    """``size`` examples of digits' training split, shuffled by seed, and ``others``
    further examples disjoint from them (the other clients' data; none by default)."""
    data = digits_examples()
    if size + others > len(data.y):
        raise ValueError(f"the pool and the other clients' data have at most {len(data.y)} "
                         f"examples; got {size} + {others}")
    idx = np.random.default_rng(seed).permutation(len(data.y))
    pool, rest = idx[:size], idx[size:size + others]
    return ImageArrays(data.x[pool], data.y[pool]), ImageArrays(data.x[rest], data.y[rest])


def _dp_for(cfg: MIConfig, n: int, steps: int, seed: int) -> tuple[DPSGD, dict]:
    """DP-SGD for a client of ``n`` examples whose ``steps`` steps (all its rounds) must
    spend ``cfg.target_epsilon``: sigma from the app's ``noise_for_target``."""
    q = sample_rate(n, cfg.batch_size)
    sigma = noise_for_target(cfg.target_epsilon, cfg.delta, q, steps)
    dp = DPSGD(DPSettings(sigma, cfg.max_grad_norm, cfg.delta, randomness="seeded",
                          noise_seed=seed, sampler_seed=seed + 5 * 10**5,
                          grad_sample_mode=cfg.grad_sample_mode), RDPAccountant())
    return dp, {"sigma": sigma, "sample_rate": q, "steps": steps}


def train_one(cfg: MIConfig, data: ImageArrays, index: int) -> tuple[nn.Module, dict]:
    """One model on ``data``, trained by the app's ``train_local`` (DP-SGD if a target)."""
    from partitions import dataset_info

    model = build_model(dataset_info("digits"), cfg.seed * 1000 + index, kind=cfg.model)
    info: dict = {"num_examples": len(data)}
    dp = None
    if cfg.target_epsilon > 0:
        steps = cfg.epochs * steps_per_epoch(len(data), cfg.batch_size)
        dp, dp_info = _dp_for(cfg, len(data), steps, cfg.seed * 10**6 + index)
        info.update(dp_info)
    train_local(model, data, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                momentum=cfg.momentum, seed=cfg.seed * 1000 + index, dp=dp)
    if dp is not None:
        info["epsilon"] = float(dp.accountant.get_epsilon(cfg.delta))
    return model, info


def train_federation(cfg: MIConfig, target_data: ImageArrays, others: list[ImageArrays],
                     index: int) -> tuple[nn.Module, nn.Module, dict]:
    """FedAvg over client 0 (``target_data``) and ``others``, every client trained each
    round by the app's ``train_local`` from the global model (DP-SGD on every client when
    the config has a target epsilon: one accountant per client across the rounds, as a
    node keeps its ledger). Returns (the final global model, client 0's model after its
    last local training: the global model plus the update the server receives in
    plaintext without SecAgg+, info)."""
    from partitions import dataset_info

    data = [target_data, *others]
    model = build_model(dataset_info("digits"), cfg.seed * 1000 + index, kind=cfg.model)
    dps: list[DPSGD | None] = [None] * len(data)
    info: dict = {"num_examples": len(target_data)}
    if cfg.target_epsilon > 0:
        for c, d in enumerate(data):
            steps = cfg.rounds * cfg.epochs * steps_per_epoch(len(d), cfg.batch_size)
            dps[c], dp_info = _dp_for(cfg, len(d), steps, cfg.seed * 10**6 + index * 100 + c)
            if c == 0:
                info.update(dp_info)
    weights = np.array([len(d) for d in data], float) / sum(len(d) for d in data)
    target_model = None
    for rnd in range(cfg.rounds):
        states = []
        for c, d in enumerate(data):
            local = copy.deepcopy(model)  # every client starts from this round's global model
            train_local(local, d, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                        momentum=cfg.momentum, seed=(cfg.seed * 1000 + index) * 1000 + rnd * 10 + c,
                        dp=dps[c])
            if c == 0:
                target_model = local
            states.append(local.state_dict())
        model.load_state_dict({k: sum(w * s[k] for w, s in zip(weights, states))
                               for k in states[0]})  # FedAvg: the example-weighted mean
    if dps[0] is not None:
        info["epsilon"] = float(dps[0].accountant.get_epsilon(cfg.delta))
    return model, target_model, info


def train_user_federation(cfg: MIConfig, users: list[ImageArrays], index: int
                          ) -> tuple[nn.Module, dict]:
    """FedAvg over ``users`` (every one sampled every round, each trained by the app's
    ``train_local`` from the global model), the server step being DP-FedAvg's when the
    config has a target epsilon: the app's own ``UserLevelDP.release`` (re-clip every
    update to C, uniform mean, Gaussian noise of std sigma C / m; seeded noise, an
    experiment) with sigma from the app's ``user_noise`` for ``rounds`` releases. Without
    DP the server takes the uniform mean of the unclipped updates (equal data sizes: what
    FedAvg's example weighting gives). Returns the final global model and info."""
    from types import SimpleNamespace

    from flwr.serverapp.strategy import FedAvg

    from partitions import dataset_info
    from strategies.user_dp import UserLevelDP, user_level_epsilon, user_noise

    model = build_model(dataset_info("digits"), cfg.seed * 1000 + index, kind=cfg.model)
    mechanism, info = None, {"num_users": len(users)}
    if cfg.target_epsilon > 0:
        sigma = user_noise(SimpleNamespace(dp_target_epsilon=cfg.target_epsilon,
                                           dp_delta=cfg.delta, num_server_rounds=cfg.rounds))
        mechanism = UserLevelDP(FedAvg(), noise_multiplier=sigma, clipping_norm=cfg.max_grad_norm,
                                num_sampled_clients=len(users), delta=cfg.delta,
                                randomness="seeded", seed=cfg.seed * 10**6 + index)
        info.update({"sigma": sigma, "noise_std": mechanism.noise_std(), "reclipped": 0})
    for rnd in range(1, cfg.rounds + 1):
        x = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
        updates = []
        for u, d in enumerate(users):
            local = copy.deepcopy(model)
            train_local(local, d, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                        momentum=cfg.momentum, seed=(cfg.seed * 1000 + index) * 1000 + rnd * 100 + u)
            updates.append({k: v.detach().double().numpy() - x[k]
                            for k, v in local.state_dict().items()})
        if mechanism is None:
            step = {k: sum(up[k] for up in updates) / len(updates) for k in x}
        else:
            step, reclipped = mechanism.release(rnd, updates)
            info["reclipped"] += reclipped
        model.load_state_dict({k: torch.from_numpy(x[k] + step[k]).float() for k in x})
    if mechanism is not None:
        info["epsilon"] = user_level_epsilon(mechanism.noise_multiplier, cfg.rounds, cfg.delta)
    return model, info


def run_user_config(cfg: MIConfig, log=print) -> dict:
    """Client membership: ``cfg.users`` users of ``cfg.per_user`` examples each (disjoint,
    from the pool's seed); training m takes exactly half of them (its mask). Each user's
    statistic on a model is the mean over its examples of phi (LiRA) or of -loss (the loss
    attack); every training in turn is the target, the others its shadows, as for examples."""
    started = time.perf_counter()
    pool, _ = load_pool(cfg.users * cfg.per_user, cfg.seed)
    users = [ImageArrays(pool.x[u * cfg.per_user:(u + 1) * cfg.per_user],
                         pool.y[u * cfg.per_user:(u + 1) * cfg.per_user]) for u in range(cfg.users)]
    test = load_test_data("digits")
    rng = np.random.default_rng(cfg.seed + 1)
    masks = np.zeros((cfg.models, cfg.users), bool)
    for m in range(cfg.models):
        masks[m, rng.permutation(cfg.users)[:cfg.users // 2]] = True
    conf = np.zeros((cfg.models, cfg.users))
    neg_loss = np.zeros((cfg.models, cfg.users))
    models_info = []
    for m in range(cfg.models):
        members = [users[u] for u in np.flatnonzero(masks[m])]
        model, info = train_user_federation(cfg, members, m)
        _, phi = outputs(model, pool)
        conf[m] = phi.reshape(cfg.users, cfg.per_user).mean(1)
        # the loss as softplus(-phi) (equal to the cross-entropy), which does not round a
        # confident model's losses to 0.0 and so tie the users
        neg_loss[m] = -np.logaddexp(0.0, -phi).reshape(cfg.users, cfg.per_user).mean(1)
        member_data = ImageArrays(np.concatenate([d.x for d in members]),
                                  np.concatenate([d.y for d in members]))
        info["train_accuracy"] = float(evaluate(model, member_data)[1])
        info["test_accuracy"] = float(evaluate(model, test)[1])
        models_info.append(info)
    labels = masks.flatten()
    attacks = {f"global model, users: {name}": summarize(scores, labels, cfg.seed)
               for name, scores in attack_scores(conf, masks, neg_loss).items()}
    return _record(cfg, labels, models_info, attacks, started, log,
                   {"masks": masks, "user_confidences": conf, "user_neg_losses": neg_loss})


def _record(cfg: MIConfig, labels: np.ndarray, models_info: list[dict], attacks: dict,
            started: float, log, arrays: dict) -> dict:
    """A configuration's record (main() writes ``arrays`` to NAME.arrays.npz), logged."""
    record = {
        "config": asdict(cfg), "trials": int(labels.size), "members": int(labels.sum()),
        "models": models_info,
        "train_accuracy_mean": float(np.mean([i["train_accuracy"] for i in models_info])),
        "test_accuracy_mean": float(np.mean([i["test_accuracy"] for i in models_info])),
        "epsilon_max": max((i.get("epsilon", 0.0) for i in models_info), default=0.0) or None,
        "attacks": attacks, "seconds": time.perf_counter() - started, "arrays": arrays,
    }
    log(f"{cfg.name}: train acc {record['train_accuracy_mean']:.3f}, test "
        f"{record['test_accuracy_mean']:.3f}, eps {record['epsilon_max']}; " + "; ".join(
            f"{a} AUC {r['auc']:.3f} TPR@1e-3 {r['tpr_at_fpr_0.001']['tpr']:.4f} TPR@1e-2 "
            f"{r['tpr_at_fpr_0.01']['tpr']:.4f}" for a, r in attacks.items())
        + f" ({record['seconds']:.0f} s)")
    return record


def attack_scores(conf: np.ndarray, masks: np.ndarray,
                  loss_scores: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every trial's score under each attack, flattened as ``masks.flatten()``: conf and
    masks are (models, units). ``loss_scores``: the loss attack's (default: phi, below)."""
    # the loss attack thresholds the loss; loss = softplus(-phi) is strictly decreasing in
    # phi, so phi ranks exactly as -loss does, without the loss's underflow to 0.0 (a DP
    # model's large logits tie many examples at loss 0 in float64)
    offline, online = zip(*(lira_scores(conf, masks, m) for m in range(len(conf))))
    return {"loss": (conf if loss_scores is None else loss_scores).flatten(),
            "lira_offline": np.concatenate(offline), "lira_online": np.concatenate(online)}


def _attacks(conf: np.ndarray, masks: np.ndarray, seed: int) -> dict:
    labels = masks.flatten()
    return {name: summarize(scores, labels, seed)
            for name, scores in attack_scores(conf, masks).items()}


def record_scores(record: dict, arrays) -> dict[str, np.ndarray]:
    """Every attack's trial scores of a written record, recomputed from its arrays file,
    keyed as ``record["attacks"]`` is."""
    masks = arrays["masks"]
    if record["config"].get("users", 0):
        return {f"global model, users: {k}": v for k, v in attack_scores(
            arrays["user_confidences"], masks, arrays["user_neg_losses"]).items()}
    if record["config"].get("clients", 1) > 1:
        return {f"{target}: {k}": v
                for target, key in (("global model", "confidences"),
                                    ("client 0's update", "update_confidences"))
                for k, v in attack_scores(arrays[key], masks).items()}
    return attack_scores(arrays["confidences"], masks)


def epsilon_bounds(record: dict, arrays) -> dict[str, dict]:
    """Per attack, the audit's one-sided 95% lower bound on epsilon from these trials
    (``experiments.audit.audit_scores``: the rule chosen on a random half of the members'
    and non-members' scores, its Clopper-Pearson TPR / FPR bounds on the other half). The
    trials of one model share it and one example (user) appears in every model, so they
    are not independent, as Clopper-Pearson assumes: a comparison, not an audit."""
    from experiments.audit import audit_scores

    labels = arrays["masks"].flatten().astype(bool)
    out = {}
    for name, scores in record_scores(record, arrays).items():
        result = audit_scores(scores[labels], scores[~labels], delta=record["config"]["delta"])
        out[name] = {"epsilon_lower_bound": result["epsilon_lower_bound"],
                     "orientation": result["orientation"], "evaluation": result["evaluation"]}
    return out


def held_out_threshold(record: dict, arrays, attack: str, fpr: float) -> list[dict]:
    """The TPR-at-FPR rule chosen on one half of the models (trainings) and applied to the
    other half, both ways round: how many members and non-members it flags there. A
    threshold fitted to a handful of false positives on the same trials reports an FPR
    biased low; this is the check of that."""
    masks = arrays["masks"].astype(bool)
    scores = record_scores(record, arrays)[attack].reshape(masks.shape)
    half = len(masks) // 2
    out = []
    for chosen, applied in ((slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))):
        t = tpr_at_fpr(scores[chosen].flatten(), masks[chosen].flatten(), fpr)["threshold"]
        s, m = scores[applied].flatten(), masks[applied].flatten()
        out.append({"chosen_on_models": [chosen.start or 0, chosen.stop or len(masks)],
                    "members_flagged": int((s[m] >= t).sum()), "members": int(m.sum()),
                    "non_members_flagged": int((s[~m] >= t).sum()), "non_members": int((~m).sum())})
    return out


def all_epsilon_bounds(records: list[dict], out: Path) -> dict[str, dict[str, dict]]:
    """``epsilon_bounds`` of every record, by configuration name, from its arrays in ``out``."""
    bounds = {}
    for r in records:
        with np.load(out / r["arrays_file"]) as arrays:
            bounds[r["config"]["name"]] = epsilon_bounds(r, arrays)
    return bounds


def bounds_table(records: list[dict], all_bounds: dict[str, dict[str, dict]]) -> str:
    """Each configuration's largest lower bound over its attacks beside the epsilon that
    must bound it (``_bound_epsilon``)."""
    lines = ["| configuration | accountant's epsilon | epsilon the attack must respect | "
             "largest lower bound (attack) | every attack's bound |", "|---|---|---|---|---|"]
    for r in records:
        bounds = all_bounds[r["config"]["name"]]
        best = max(bounds, key=lambda k: bounds[k]["epsilon_lower_bound"])
        limit = _bound_epsilon(r)
        eps = f"{r['epsilon_max']:.2f}" if r["epsilon_max"] else "no DP"
        lines.append(f"| {r['config']['name']} | {eps} | "
                     f"{f'{limit:.2f}' if limit is not None else '—'} | "
                     f"{bounds[best]['epsilon_lower_bound']:.3f} ({best}) | "
                     + ", ".join(f"{b['epsilon_lower_bound']:.2f}" for b in bounds.values()) + " |")
    return "\n".join(lines) + "\n"


def run_config(cfg: MIConfig, log=print) -> dict:
    if cfg.user_level:
        return run_user_config(cfg, log)
    started = time.perf_counter()
    per_client = cfg.pool // 2  # each other client holds as many as client 0 expects to
    pool, rest = load_pool(cfg.pool, cfg.seed, others=per_client * (cfg.clients - 1))
    others = [ImageArrays(rest.x[i * per_client:(i + 1) * per_client],
                          rest.y[i * per_client:(i + 1) * per_client])
              for i in range(cfg.clients - 1)]
    test = load_test_data("digits")
    masks = np.random.default_rng(cfg.seed + 1).random((cfg.models, cfg.pool)) < 0.5
    losses = np.zeros((cfg.models, cfg.pool))
    conf = np.zeros((cfg.models, cfg.pool))
    update_conf = np.zeros((cfg.models, cfg.pool))
    models_info = []
    for m in range(cfg.models):
        idx = np.flatnonzero(masks[m])
        member_data = ImageArrays(pool.x[idx], pool.y[idx])
        if cfg.federated:
            model, client_model, info = train_federation(cfg, member_data, others, m)
            _, update_conf[m] = outputs(client_model, pool)
        else:
            model, info = train_one(cfg, member_data, m)
        losses[m], conf[m] = outputs(model, pool)
        info["train_accuracy"] = float(evaluate(model, member_data)[1])
        info["test_accuracy"] = float(evaluate(model, test)[1])
        models_info.append(info)
    labels = masks.flatten()
    if cfg.federated:  # what the final model leaks, and what client 0's last update does
        attacks = {f"{target}: {name}": result
                   for target, c in (("global model", conf), ("client 0's update", update_conf))
                   for name, result in _attacks(c, masks, cfg.seed).items()}
    else:
        attacks = _attacks(conf, masks, cfg.seed)
    # (models, pool) membership, loss and confidence
    return _record(cfg, labels, models_info, attacks, started, log,
                   {"masks": masks, "losses": losses, "confidences": conf,
                    **({"update_confidences": update_conf} if cfg.federated else {})})


CONFIGS = {
    "nodp": MIConfig("nodp"),
    "dp-eps8": MIConfig("dp-eps8", 8.0),
    "dp-eps1": MIConfig("dp-eps1", 1.0),
    # a smaller pool (about 100 training examples per model): more overfitting
    "small-nodp": MIConfig("small-nodp", pool=200),
    "small-dp-eps8": MIConfig("small-dp-eps8", 8.0, pool=200),
    "small-dp-eps1": MIConfig("small-dp-eps1", 1.0, pool=200),
    # the target is one client of a FedAvg federation of 4 (about 200 examples each),
    # 10 rounds of 3 local epochs (30 epochs of training, as above); epsilon over all rounds
    "fed-nodp": MIConfig("fed-nodp", pool=400, epochs=3, clients=4, rounds=10),
    **{f"fed-dp-eps{eps:g}": MIConfig(f"fed-dp-eps{eps:g}", eps, pool=400, epochs=3,
                                       clients=4, rounds=10) for eps in (8.0, 4.0, 2.0, 1.0, 0.5)},
    # client membership (user-level): 64 users of 15 examples, each federation a random 32
    # of them, all sampled, 10 rounds of 5 local epochs; DP-FedAvg's sigma for 10 releases
    **{name: MIConfig(name, eps, models=32, users=64, per_user=15, epochs=5, rounds=10)
       for name, eps in (("user-nodp", 0.0), ("user-dp-eps8", 8.0), ("user-dp-eps4", 4.0),
                         ("user-dp-eps2", 2.0), ("user-dp-eps1", 1.0), ("user-dp-eps0.5", 0.5))},
}

# the attack each target of the joint figures shows, per family of configurations
FIGURE_ATTACK = "lira_online"
FIGURE_TARGETS = {  # attack keys: "<target>: <attack>"
    "example": ("global model", "client 0's update"),  # fed-*: one example's membership
    "user": ("global model, users",),  # user-*: one client's membership
}


def table(records: list[dict]) -> str:
    lines = ["| configuration | epsilon (accountant, max over models) | train / test accuracy | attack | "
             "ROC-AUC [95% bootstrap] | TPR at FPR 1e-3 [95% CP] | TPR at FPR 1e-2 [95% CP] |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        eps = f"{r['epsilon_max']:.2f}" if r["epsilon_max"] else "no DP"
        for a, s in r["attacks"].items():
            t3, t2 = s["tpr_at_fpr_0.001"], s["tpr_at_fpr_0.01"]
            lines.append(
                f"| {r['config']['name']} | {eps} | {r['train_accuracy_mean']:.3f} / "
                f"{r['test_accuracy_mean']:.3f} | {a} | {s['auc']:.3f} [{s['auc_ci95'][0]:.3f}, "
                f"{s['auc_ci95'][1]:.3f}] | {t3['tpr']:.4f} [{t3['tpr_ci95'][0]:.4f}, "
                f"{t3['tpr_ci95'][1]:.4f}] | {t2['tpr']:.4f} [{t2['tpr_ci95'][0]:.4f}, "
                f"{t2['tpr_ci95'][1]:.4f}] |")
    return "\n".join(lines) + "\n"


def record_family(record: dict) -> str:
    """"model" (one model trained on a random half), "example" (``clients`` > 1: one
    example's membership in a federation) or "user" (``users`` > 0: one client's)."""
    if record["config"].get("users", 0):
        return "user"
    return "example" if record["config"].get("clients", 1) > 1 else "model"


def summary_table(records: list[dict], all_bounds: dict[str, dict[str, dict]],
                  which: str) -> str:
    """One federated family's ``FIGURE_ATTACK`` metrics per target, its federations' test
    accuracy, and the largest lower bound on epsilon over all its attacks and targets beside
    the epsilon that must bound it (``_bound_epsilon``): the tables docs/privacy.md shows."""
    targets = FIGURE_TARGETS[which]
    if which == "example":
        header = ("| configuration | epsilon | test accuracy % | global model: AUC [95%] | "
                  "global: TPR at FPR 1e-3 [95% CP] | client 0's update: AUC | "
                  "update: TPR at FPR 1e-3 | largest epsilon lower bound (≤ the claim) |")
    else:
        header = ("| configuration | epsilon (add/remove) | test accuracy % | LiRA online AUC [95%] | "
                  "TPR at FPR 1e-3 [95% CP] | largest epsilon lower bound "
                  "(≤ the replace-one epsilon) |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in records:
        if record_family(r) != which:
            continue
        cells = [r["config"]["name"], f"{r['epsilon_max']:.2f}" if r["epsilon_max"] else "no DP",
                 f"{100 * r['test_accuracy_mean']:.1f}"]
        for target in targets:
            a = r["attacks"][f"{target}: {FIGURE_ATTACK}"]
            t3 = a["tpr_at_fpr_0.001"]
            tpr = f"{t3['tpr']:.4f} [{t3['tpr_ci95'][0]:.4f}, {t3['tpr_ci95'][1]:.4f}]"
            cells += [f"{a['auc']:.3f} [{a['auc_ci95'][0]:.3f}, {a['auc_ci95'][1]:.3f}]", tpr]
        best = max(b["epsilon_lower_bound"] for b in all_bounds[r["config"]["name"]].values())
        limit = _bound_epsilon(r)
        cells.append(f"{best:.2f}" + (f" (≤ {limit:.2f})" if limit is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load_records(out: Path) -> list[dict]:
    """The configurations' records in ``out`` (not held-out-thresholds.json), in the order
    of CONFIGS."""
    order = list(CONFIGS)
    records = [json.loads(p.read_text()) for p in sorted(Path(out).glob("*.json"))
               if p.name != "held-out-thresholds.json"]
    records.sort(key=lambda r: order.index(r["config"]["name"]) if r["config"]["name"] in order else 99)
    return records


def build_table(out: Path, records: list[dict] | None = None,
                bounds: dict[str, dict[str, dict]] | None = None) -> str:
    """table.md from the records in ``out`` (and, for the bounds, their arrays), in the
    order of CONFIGS: what ``--table-only`` writes and ``experiments.docs_check`` checks
    (``records`` and ``bounds``, where the caller has them already, are not read again).
    Tables: 1 single models, 2 federations (example membership), 3 user-level federations
    (client membership), 4 every configuration's lower bounds on epsilon, 5 and 6 the
    federations' summaries (LiRA online per target, accuracy, the largest bound)."""
    records = load_records(out) if records is None else records
    bounds = all_epsilon_bounds(records, Path(out)) if bounds is None else bounds
    by = {k: [r for r in records if record_family(r) == k] for k in ("model", "example", "user")}
    return (
        "Membership inference (experiments/membership.py): digits, the app's MLP trained by "
        "train_local on random halves of a pool; every model the target once, the others its "
        "shadows.\n\nSingle models (one example's membership):\n\n" + table(by["model"])
        + "\nFederations (one example's membership; two targets: the final global model and "
        "client 0's update):\n\n" + table(by["example"])
        + "\nUser-level federations (one client's membership, on the final global model):\n\n"
        + table(by["user"])
        + "\nEach attack's trials turned into a one-sided 95% lower bound on epsilon "
        "(experiments.audit.audit_scores: the rule chosen on half of the trials, its "
        "Clopper-Pearson bounds on the other half; the trials of one model are not "
        "independent, so this compares, it does not audit). The epsilon the attack must "
        "respect is the accountant's for example membership and, for client membership, "
        "that of sigma / 2 (one user replaced by another: sensitivity 2C).\n\n"
        + bounds_table(records, bounds)
        + f"\nThe federations: {FIGURE_ATTACK} per target, and the largest bound over all "
        "their attacks and targets (above) beside the epsilon that must bound it.\n\n"
        + summary_table(records, bounds, "example") + "\n"
        + summary_table(records, bounds, "user"))


def _bound_epsilon(record: dict) -> float | None:
    """The epsilon that bounds this experiment's attack. Example membership (a random half
    with or without the example) is the add/remove relation the accountant reports. Client
    membership compares a federation of m users holding the target with one holding
    another user in its place: one update replaced by another of norm <= C moves the sum
    by up to 2C, so the release is a Gaussian mechanism of multiplier sigma / 2 for it
    (docs/privacy.md, the neighbouring relations), accounted the same way."""
    if record["epsilon_max"] is None:
        return None
    if not record["config"].get("users", 0):
        return record["epsilon_max"]
    from strategies.user_dp import user_level_epsilon

    sigma = min(m["sigma"] for m in record["models"])
    return user_level_epsilon(sigma / 2, record["config"]["rounds"], record["config"]["delta"])


def curve_points(records: list[dict], family: str = "example") -> list[dict]:
    """One family's federated configurations in order of epsilon, no DP last: "example"
    (``clients`` > 1: example membership) or "user" (``users`` > 0: client membership).
    Per configuration the accountant's epsilon (None without DP), the federations' test
    accuracy, and per target of ``FIGURE_TARGETS[family]`` the ``FIGURE_ATTACK`` metrics."""
    points = []
    for r in records:
        if record_family(r) != family:
            continue
        attacks = {t: r["attacks"][f"{t}: {FIGURE_ATTACK}"] for t in FIGURE_TARGETS[family]}
        points.append({"name": r["config"]["name"], "epsilon": r["epsilon_max"],
                       "bound_epsilon": _bound_epsilon(r),
                       "delta": r["config"]["delta"], "test_accuracy": r["test_accuracy_mean"],
                       "attacks": attacks})
    return sorted(points, key=lambda p: (p["epsilon"] is None, p["epsilon"] or 0.0))


def write_figure(records: list[dict], path: Path, family: str = "example",
                 all_bounds: dict[str, dict[str, dict]] | None = None) -> bool:
    """Utility and leakage of the same federations against one epsilon axis: test accuracy,
    the attack's ROC-AUC (95% bootstrap interval) and its TPR at FPR 1e-3 (95% CP interval)
    beside what (epsilon, delta)-DP allows, e^epsilon x FPR + delta. No DP is drawn at the
    right, past the largest epsilon. Returns False (and writes nothing) when there are fewer
    than two federated configurations."""
    points = curve_points(records, family)
    if len(points) < 2:
        return False
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = [p["epsilon"] for p in points if p["epsilon"] is not None]
    nodp_x = 2 * max(eps) if eps else 1.0
    xs = [p["epsilon"] if p["epsilon"] is not None else nodp_x for p in points]
    fig, axes = plt.subplots(1, 4 if all_bounds else 3, figsize=(17 if all_bounds else 13, 3.8))
    axes[0].plot(xs, [100 * p["test_accuracy"] for p in points], "o-", color="k")
    axes[0].set_ylabel("test accuracy % (mean over the federations)")
    for target, style in zip(FIGURE_TARGETS[family], ("o-", "s--")):
        a = [p["attacks"][target] for p in points]
        auc = np.array([s["auc"] for s in a])
        ci = np.array([s["auc_ci95"] for s in a])
        axes[1].errorbar(xs, auc, yerr=[auc - ci[:, 0], ci[:, 1] - auc], fmt=style,
                         capsize=3, label=f"{FIGURE_ATTACK}, {target}")
        t = [s["tpr_at_fpr_0.001"] for s in a]
        tpr = np.array([s["tpr"] for s in t])
        tci = np.array([s["tpr_ci95"] for s in t])
        axes[2].errorbar(xs, tpr, yerr=[tpr - tci[:, 0], tci[:, 1] - tpr], fmt=style,
                         capsize=3, label=f"{FIGURE_ATTACK}, {target}")
    axes[1].axhline(0.5, color="grey", lw=0.8)
    axes[1].set_ylabel("ROC-AUC (0.5: chance)")
    bounded = [(x, p) for x, p in zip(xs, points) if p["epsilon"] is not None]
    if bounded:
        axes[2].plot([x for x, _ in bounded],
                     [min(1.0, math.exp(p["bound_epsilon"]) * 1e-3 + p["delta"]) for _, p in bounded],
                     "v:", color="grey",
                     label="what DP allows: e^eps' FPR + delta" + (
                         " (eps': replace-one, sigma / 2)" if family == "user" else ""))
    top = max(s["tpr_at_fpr_0.001"]["tpr_ci95"][1] for p in points for s in p["attacks"].values())
    axes[2].set_ylim(0, 1.3 * top)
    axes[2].set_ylabel("TPR at FPR 1e-3")
    if all_bounds:  # every attack's lower bound on epsilon against the claim
        lows = [max(v["epsilon_lower_bound"] for v in all_bounds[p["name"]].values())
                for p in points]
        axes[3].plot(xs, lows, "o-", color="C3", label="largest lower bound over the attacks")
        claimed = [(x, p["bound_epsilon"]) for x, p in zip(xs, points) if p["epsilon"] is not None]
        axes[3].plot([x for x, _ in claimed], [e for _, e in claimed], "v:", color="grey",
                     label="the epsilon it must not exceed")
        axes[3].set_ylabel("epsilon (one-sided 95% lower bound)")
        axes[3].legend(fontsize=7)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:.2g}" if p["epsilon"] is not None else "no DP"
                            for x, p in zip(xs, points)])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("epsilon (accountant, over all rounds)")
    axes[1].legend(fontsize=7)
    axes[2].legend(fontsize=7, loc="upper center")
    fig.suptitle({"example": "Example membership against a FedAvg federation of 4 clients on digits "
                             "(experiments/membership.py fed-*; sample-level DP-SGD)",
                  "user": "Client membership against FedAvg over 32 of 64 users on digits "
                          "(experiments/membership.py user-*; user-level DP-FedAvg)"}[family]
                 + ": utility and leakage of the same models", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--models", type=int, default=0, help="0: the config's own")
    parser.add_argument("--pool", type=int, default=0, help="0: the config's own")
    parser.add_argument("--epochs", type=int, default=0, help="0: the config's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table-only", action="store_true",
                        help="train nothing: rebuild table.md and the figures from the records")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m experiments.membership",
                        *(argv if argv is not None else sys.argv[1:])])
    overrides = {k: v for k, v in (("models", args.models), ("pool", args.pool),
                                   ("epochs", args.epochs)) if v}
    for name in ([] if args.table_only else args.configs):
        cfg = MIConfig(**{**asdict(CONFIGS[name]), "seed": args.seed, **overrides})
        record = run_config(cfg)
        np.savez_compressed(args.out / f"{name}.arrays.npz", **record.pop("arrays"))
        record["arrays_file"] = f"{name}.arrays.npz"
        record.update({"command": command, "created": datetime.now(UTC).isoformat(timespec="seconds"),
                       "torch": torch.__version__, "python": platform.python_version(),
                       "threads": args.threads})
        (args.out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    records = load_records(args.out)
    bounds = all_epsilon_bounds(records, args.out)
    (args.out / "table.md").write_text(build_table(args.out, records, bounds))
    held_out = {}
    for r in records:  # the figures' TPR at FPR 1e-3, its threshold checked across models
        kind = record_family(r)
        if kind != "model":
            with np.load(args.out / r["arrays_file"]) as arrays:
                held_out[r["config"]["name"]] = {
                    t: held_out_threshold(r, arrays, f"{t}: {FIGURE_ATTACK}", 1e-3)
                    for t in FIGURE_TARGETS[kind]}
    (args.out / "held-out-thresholds.json").write_text(json.dumps(held_out, indent=1) + "\n")
    write_figure(records, args.out / "curve.png", "example", bounds)
    write_figure(records, args.out / "user-curve.png", "user", bounds)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
