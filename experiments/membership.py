"""Membership inference against models trained by the app's own code, without and with
DP-SGD (issue 22, second attack).

    python -m experiments.membership --out docs/results/membership/
    python -m experiments.membership --configs nodp --models 8 --pool 400
    python -m experiments.membership --configs fed-nodp fed-dp-eps8 fed-dp-eps1

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

    @property
    def federated(self) -> bool:
        return self.clients > 1


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


def _attacks(conf: np.ndarray, masks: np.ndarray, seed: int) -> dict:
    labels = masks.flatten()
    # the loss attack thresholds the loss; loss = softplus(-phi) is strictly decreasing in
    # phi, so phi ranks exactly as -loss does, without the loss's underflow to 0.0 (a DP
    # model's large logits tie many examples at loss 0 in float64)
    offline, online = zip(*(lira_scores(conf, masks, m) for m in range(len(conf))))
    return {
        "loss": summarize(conf.flatten(), labels, seed),
        "lira_offline": summarize(np.concatenate(offline), labels, seed),
        "lira_online": summarize(np.concatenate(online), labels, seed),
    }


def run_config(cfg: MIConfig, log=print) -> dict:
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
    record = {
        "config": asdict(cfg), "trials": int(labels.size), "members": int(labels.sum()),
        "models": models_info,
        "train_accuracy_mean": float(np.mean([i["train_accuracy"] for i in models_info])),
        "test_accuracy_mean": float(np.mean([i["test_accuracy"] for i in models_info])),
        "epsilon_max": max((i.get("epsilon", 0.0) for i in models_info), default=0.0) or None,
        "attacks": attacks, "seconds": time.perf_counter() - started,
    }
    # main() writes them to NAME.arrays.npz: (models, pool) membership, loss and confidence
    record["arrays"] = {"masks": masks, "losses": losses, "confidences": conf,
                        **({"update_confidences": update_conf} if cfg.federated else {})}
    log(f"{cfg.name}: train acc {record['train_accuracy_mean']:.3f}, test "
        f"{record['test_accuracy_mean']:.3f}, eps {record['epsilon_max']}; " + "; ".join(
            f"{a} AUC {r['auc']:.3f} TPR@1e-3 {r['tpr_at_fpr_0.001']['tpr']:.4f} TPR@1e-2 "
            f"{r['tpr_at_fpr_0.01']['tpr']:.4f}" for a, r in attacks.items())
        + f" ({record['seconds']:.0f} s)")
    return record


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
    "fed-dp-eps8": MIConfig("fed-dp-eps8", 8.0, pool=400, epochs=3, clients=4, rounds=10),
    "fed-dp-eps1": MIConfig("fed-dp-eps1", 1.0, pool=400, epochs=3, clients=4, rounds=10),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--models", type=int, default=0, help="0: the config's own")
    parser.add_argument("--pool", type=int, default=0, help="0: the config's own")
    parser.add_argument("--epochs", type=int, default=0, help="0: the config's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m experiments.membership",
                        *(argv if argv is not None else sys.argv[1:])])
    overrides = {k: v for k, v in (("models", args.models), ("pool", args.pool),
                                   ("epochs", args.epochs)) if v}
    for name in args.configs:
        cfg = MIConfig(**{**asdict(CONFIGS[name]), "seed": args.seed, **overrides})
        record = run_config(cfg)
        np.savez_compressed(args.out / f"{name}.arrays.npz", **record.pop("arrays"))
        record["arrays_file"] = f"{name}.arrays.npz"
        record.update({"command": command, "created": datetime.now(UTC).isoformat(timespec="seconds"),
                       "torch": torch.__version__, "python": platform.python_version(),
                       "threads": args.threads})
        (args.out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    order = list(CONFIGS)
    records = [json.loads(p.read_text()) for p in sorted(args.out.glob("*.json"))]
    records.sort(key=lambda r: order.index(r["config"]["name"]) if r["config"]["name"] in order else 99)
    (args.out / "table.md").write_text(
        "Membership inference (experiments/membership.py): digits, the app's MLP trained by "
        "train_local on random halves of a pool; every model the target once, the others its "
        "shadows.\n\n" + table(records))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
