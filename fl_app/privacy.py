"""Sample-level differential privacy for local training: Opacus DP-SGD, and its accounting
across rounds.

Mechanism (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, Algorithm 1;
Opacus, Yousefpour et al., 2021): every local step samples each of the client's n
training examples independently with rate q (Poisson sampling, Opacus's
``UniformWithReplacementSampler``), clips each example's gradient to L2 norm C
(``dp-max-grad-norm``), adds N(0, sigma^2 C^2 I) to their sum (sigma =
``dp-noise-multiplier``) and divides by the expected batch size q n (Opacus's
``GradSampleModule`` and ``DPOptimizer``; we write no DP-SGD of our own). One local epoch
is ceil(n / B) such steps with q = 1 / ceil(n / B) (B = ``batch-size``), Opacus's own
convention for ``DPDataLoader``.

Post-processing. A strategy's client half (FedProx's proximal gradient, SCAFFOLD's
correction and its gradient sum) runs after the privatization, on the noised gradient:
it depends on the data only through it, so everything the client sends stays a function
of the privatized gradients.

Accounting. Opacus's RDP accountant composes every step the client ever took in the run:
its history (sigma, q, steps) lives in the node's ``Context.state`` and is restored
before each round, so epsilon is the total over all rounds, not one round's (the mistake
of building a new PrivacyEngine per round). When the node config names a ``state-dir``
the history is also written there, atomically, keyed by run and partition, so a
SuperNode that restarts does not forget its spend. The spend counts whether or not the
server later uses the reply: the noisy result was computed and sent.

Randomness (``fl_common/randomness.py``). With ``dp-randomness = "secure"`` (the
default) the noise generator and the Poisson sampler's generator are keyed per round from
the operating system's CSPRNG, never from the run config (whose ``seed`` the server
chose), and the noise is drawn with Opacus's floating-point-robust construction
(``DPOptimizer(secure_mode=True)``: a discarded draw, then the mean of four, against the
attack of Mironov, CCS 2012). ``"seeded"`` derives both from (``seed``, round,
partition), as the app did before: reproducible for experiments, and therefore
predictable by the server, which can regenerate the noise and subtract it
(tests/test_dp_randomness.py shows it). The server accepts ``"seeded"`` only in
simulation and marks such runs in summary.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import ConfigRecord, RecordDict
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn

from fl_common import wire
from fl_common.randomness import RANDOMNESS_MODES, derive_seed, secret_torch_generator

from fl_common.atomic import safe_name, write_atomic
from .training import model_device

if TYPE_CHECKING:  # pragma: no cover
    from .config import RunConfig

STATE_HISTORY = "dp-history"  # Context.state: the accountant's history and its run tag
NOISE_TAG = 0xD9  # separates the noise seed from every other use of `seed`
# How Opacus computes per-sample gradients: "hooks", "functorch" or "ew" (PyTorch's
# expanded weights). Each is checked against gradients computed by hand
# (tests/test_dp_modes.py); an empty Poisson batch takes its step without a forward pass
# (PrivateTraining.empty_step), which "ew" and "functorch" could not run. "ew", the
# default, measured 10-16 % faster than "hooks" at batches 32-256 for the CNN
# (docs/benchmarks/dp_overhead.jsonl); "functorch" was slower than both.
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew")


@dataclass(frozen=True)
class DPSettings:
    """What one client's DP-SGD needs (symbols as in Abadi et al.)."""

    noise_multiplier: float  # sigma
    max_grad_norm: float  # C
    delta: float  # the delta epsilon is reported at
    randomness: str = "secure"  # "secure": CSPRNG-keyed generators; "seeded": the seeds below
    noise_seed: int | None = None  # "seeded" only: the noise generator's seed
    sampler_seed: int | None = None  # "seeded" only: the Poisson sampler's seed
    grad_sample_mode: str = "ew"  # Opacus's per-sample gradient mode (GRAD_SAMPLE_MODES)

    def __post_init__(self) -> None:
        if self.randomness not in RANDOMNESS_MODES:
            raise ValueError(f"DP randomness must be one of {list(RANDOMNESS_MODES)}, got "
                             f"{self.randomness!r}")
        seeds = (self.noise_seed, self.sampler_seed)
        if self.randomness == "seeded" and None in seeds:
            raise ValueError("Seeded DP randomness needs both a noise and a sampler seed")
        if self.randomness == "secure" and seeds != (None, None):
            raise ValueError("Secure DP randomness takes no seeds: its generators are keyed "
                             "from the OS CSPRNG")


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """ceil(n / B): the Poisson-sampled steps of one local epoch."""
    return max(1, math.ceil(num_examples / batch_size))


def sample_rate(num_examples: int, batch_size: int) -> float:
    """q = 1 / ceil(n / B), so that an epoch samples each example once in expectation
    (nudged down if needed so that Opacus's sampler, int(1 / q) steps, takes exactly
    ceil(n / B) steps)."""
    k = steps_per_epoch(num_examples, batch_size)
    q = 1.0 / k
    while int(1.0 / q) < k:
        q = math.nextafter(q, 0.0)
    return q


def round_noise(cfg: "RunConfig", num_examples: int) -> float:
    """sigma for this client: ``dp-noise-multiplier``, or, with ``dp-target-epsilon``, the
    sigma at which num-server-rounds rounds of local-epochs epochs spend the target (every
    round counted, so a client sampled in fewer rounds spends less)."""
    if cfg.dp_target_epsilon > 0:
        steps = cfg.num_server_rounds * cfg.local_epochs * steps_per_epoch(num_examples, cfg.batch_size)
        return noise_for_target(float(cfg.dp_target_epsilon), float(cfg.dp_delta),
                                sample_rate(num_examples, cfg.batch_size), steps)
    return float(cfg.dp_noise_multiplier)


def check_model(model: nn.Module) -> None:
    """Raise with Opacus's reasons if it cannot compute per-sample gradients of ``model``."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError("The model cannot be trained with DP-SGD: "
                         + "; ".join(str(e) for e in errors))


# ------------------------------------------------------------------ accountant state
NODE_SCOPE = "node"  # the accountant of a deployed node: every run on its data, composed
Entry = tuple  # (sigma, q, steps, run tag): one round's DP-SGD steps in one run


def accountant_file(state_dir: str, scope: str, partition_id: int) -> Path:
    """Where a node keeps its accountant history on disk: keyed by scope (the run tag in
    simulation, ``NODE_SCOPE`` on a deployed node) and partition, since node ids change
    when a SuperNode restarts."""
    return Path(state_dir).expanduser() / f"dp-accountant-{safe_name(scope)}-p{int(partition_id)}.json"


def _total(entries: list) -> int:
    return sum(int(e[2]) for e in entries)


def _entries(history: list, runs: list | None, scope: str) -> list[Entry]:
    runs = list(runs) if runs is not None else [scope] * len(history)
    if len(runs) != len(history):
        raise ValueError("the history and its run tags differ in length")
    return [(float(s), float(q), int(k), str(r)) for (s, q, k), r in zip(history, runs)]


def _read_file(path: Path, scope: str) -> list[Entry]:
    if not path.exists():
        return []
    try:
        payload = json.loads(path.read_text())
        if payload.get("run-tag") != scope:
            return []
        return _entries(payload["history"], payload.get("runs"), scope)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"Cannot read the privacy accountant state {path} ({err}); refusing "
                         "to train without it, since the spend would be under-counted. "
                         "Restore the file or start a new run") from None


def load_ledger(state: RecordDict, scope: str, *, path: Path | None = None) -> list[Entry]:
    """Every round's DP-SGD steps this node has taken in ``scope`` (empty at first).

    From the node's ``Context.state`` and, with ``path`` (the node's state folder), from
    disk: a SuperNode that restarted has lost its Context.state but not the file. If
    both exist the longer history wins, so the spend is never under-counted.
    """
    entries: list[Entry] = []
    record = state.get(STATE_HISTORY)
    if record is not None and record.get("run-tag") == scope:
        entries = _entries(list(zip(record["sigma"], record["q"], record["steps"])),
                           record.get("runs"), scope)
    if path is not None:
        on_disk = _read_file(path, scope)
        if _total(on_disk) > _total(entries):
            entries = on_disk
    return entries


def save_ledger(state: RecordDict, entries: list[Entry], scope: str, *,
                path: Path | None = None) -> None:
    """Keep the ledger in Context.state and, with ``path``, on disk (written to a
    temporary file, flushed, then renamed: a crash leaves the old file or the new one)."""
    state[STATE_HISTORY] = ConfigRecord({
        "run-tag": scope,
        "sigma": [float(e[0]) for e in entries],
        "q": [float(e[1]) for e in entries],
        "steps": [int(e[2]) for e in entries],
        "runs": [str(e[3]) for e in entries],
    })
    if path is not None:
        payload = {"run-tag": scope, "history": [[float(s), float(q), int(k)] for s, q, k, _ in entries],
                   "runs": [str(e[3]) for e in entries]}
        write_atomic(path, lambda handle: handle.write(json.dumps(payload).encode()))


def accountant_of(entries: list[Entry]) -> RDPAccountant:
    """Opacus's RDP accountant holding ``entries``' (sigma, q, steps)."""
    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(k)) for s, q, k, _ in entries]
    return accountant


def load_accountant(state: RecordDict, run_tag: str, *, path: Path | None = None) -> RDPAccountant:
    """The accountant with this node's history in run ``run_tag`` (empty for a new run)."""
    return accountant_of(load_ledger(state, run_tag, path=path))


def save_accountant(state: RecordDict, accountant: RDPAccountant, run_tag: str, *,
                    path: Path | None = None) -> None:
    """``save_ledger`` of an accountant whose whole history belongs to ``run_tag``."""
    save_ledger(state, [(s, q, k, run_tag) for s, q, k in accountant.history], run_tag, path=path)


def epsilon_after(accountant: RDPAccountant, delta: float, *, noise_multiplier: float = 0.0,
                  rate: float = 0.0, steps: int = 0) -> float:
    """Epsilon of the history plus ``steps`` more steps at (sigma, q); 0 for no steps."""
    history = list(accountant.history)
    if steps:
        history.append((noise_multiplier, rate, steps))
    if not history:
        return 0.0
    probe = RDPAccountant()
    probe.history = history
    return float(probe.get_epsilon(delta))


def noise_for_target(target_epsilon: float, delta: float, rate: float, total_steps: int) -> float:
    """sigma that makes ``total_steps`` steps at rate q spend ``target_epsilon`` (Opacus)."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=rate, steps=total_steps, accountant="rdp"))


# ------------------------------------------------------------------ the mechanism
class PrivateTraining:
    """Opacus's per-sample gradients, clipping and noise around ``model`` and SGD.

    ``step(after_privatize)`` replaces ``optimizer.step()``: clip, noise and scale (and
    the accountant's step), then ``after_privatize(model)`` (post-processing), then the
    SGD step. ``close()`` removes Opacus's hooks: ``model`` is the plain module again,
    with the plain state-dict keys.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, settings: DPSettings,
                 *, num_examples: int, batch_size: int, accountant: RDPAccountant) -> None:
        check_model(model)
        self.model = model
        self.num_examples = num_examples
        self.rate = sample_rate(num_examples, batch_size)
        self.steps_per_epoch = steps_per_epoch(num_examples, batch_size)
        self.settings = settings
        if settings.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {list(GRAD_SAMPLE_MODES)}, "
                             f"got {settings.grad_sample_mode!r}")
        self.module = prepare_module(model, settings.grad_sample_mode, batch_first=True,
                                     loss_reduction="mean")
        # Opacus draws the noise on the parameters' device with this generator; the
        # Poisson batches are drawn on the CPU with the other one
        secure = settings.randomness == "secure"
        if secure:
            self.noise = secret_torch_generator(model_device(model))
            self.sampling = secret_torch_generator("cpu")
        else:
            self.noise = torch.Generator(device=model_device(model)).manual_seed(
                int(settings.noise_seed))
            self.sampling = torch.Generator().manual_seed(int(settings.sampler_seed))
        self.optimizer = DPOptimizer(
            optimizer, noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm, expected_batch_size=self.rate * num_examples,
            loss_reduction="mean", generator=self.noise, secure_mode=secure,
        )
        self.optimizer.attach_step_hook(
            accountant.get_optimizer_hook_fn(sample_rate=self.rate))

    def batches(self):
        """One epoch of Poisson-sampled index batches (Opacus's sampler), drawn with this
        round's sampling generator (secret with ``randomness = "secure"``)."""
        return iter(UniformWithReplacementSampler(num_samples=self.num_examples,
                                                  sample_rate=self.rate, generator=self.sampling))

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, after_privatize=None) -> None:
        if self.optimizer.pre_step():  # clip, noise, scale; the accountant counts the step
            if after_privatize is not None:
                after_privatize(self.model)
            self.optimizer.original_optimizer.step()

    def empty_step(self, after_privatize=None) -> None:
        """The step of an empty Poisson batch, without a forward or backward pass: every
        trainable parameter gets an empty (0, *shape) per-sample gradient, so Opacus's own
        ``pre_step`` sums nothing and adds the noise alone, scaled by the expected batch
        size, and its accountant hook counts the step (as the analysis assumes). A
        forward pass of zero examples fails in the "ew" and "functorch" modes."""
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.step(after_privatize)

    def close(self) -> None:
        """Remove Opacus's hooks and per-parameter attributes from ``model``."""
        self.module._close()


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD as ``train_local`` takes it: the settings and the accountant that counts
    the steps (the node's, with its history)."""

    settings: DPSettings
    accountant: RDPAccountant

    def start(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, num_examples: int,
              batch_size: int) -> PrivateTraining:
        return PrivateTraining(model, optimizer, self.settings, num_examples=num_examples,
                               batch_size=batch_size, accountant=self.accountant)


def check_run(cfg: "RunConfig", train_sizes: list[int], model: nn.Module) -> None:
    """Before training: delta below 1/n of the smallest client, a reachable target epsilon,
    and a model Opacus can privatize. Raises ValueError saying what to change."""
    smallest = min(train_sizes)
    if not cfg.dp_delta < 1.0 / smallest:
        raise ValueError(f"Run config 'dp-delta' = {cfg.dp_delta:g} must be below 1/n = "
                         f"{1.0 / smallest:.3g} for the smallest client (n = {smallest} training "
                         "examples): a larger delta allows leaking a whole example")
    check_model(model)
    if cfg.dp_target_epsilon > 0:
        for n in sorted(set(train_sizes)):
            try:
                round_noise(cfg, n)
            except ValueError as err:
                raise ValueError(
                    f"Run config 'dp-target-epsilon' = {cfg.dp_target_epsilon:g} cannot be reached "
                    f"by a client of {n} examples over {cfg.num_server_rounds} rounds of "
                    f"{cfg.local_epochs} epoch(s) at delta {cfg.dp_delta:g} ({err}); raise the "
                    "target or lower num-server-rounds / local-epochs") from None


# ------------------------------------------------------------------ one client round
class ClientRound:
    """Sample-level DP for one client round: its ledger (from Context.state and the
    node's state folder), its sigma, the run's budget and the node's policy, and the
    reply's DP metrics.

    ``node_scope``: the ledger covers every run on this node's data (a deployed node's
    own ``state-dir``), else only this run (simulation). The run's own spend is capped
    at ``dp-max-epsilon``, or else at ``dp-target-epsilon`` (the spend it was planned
    for: a resumed or lengthened run cannot overshoot it); ``policy`` (the node's
    ``NodePolicy``) adds the node's own floor on sigma and cap on its total spend.
    """

    def __init__(self, cfg: "RunConfig", state: RecordDict, state_dir: str | None, *, run_tag: str,
                 partition_id: int, num_examples: int, server_round: int,
                 node_scope: bool = False, policy=None) -> None:
        self.state, self.run_tag, self.policy = state, run_tag, policy
        self.scope = NODE_SCOPE if node_scope else run_tag
        self.path = accountant_file(state_dir, self.scope, partition_id) if state_dir else None
        self.entries = load_ledger(state, self.scope, path=self.path)
        self.accountant = accountant_of(self.entries)  # Opacus's step hook counts into it
        self._steps_before = _total(self.entries)
        self.delta = float(cfg.dp_delta)
        self.max_epsilon = float(cfg.dp_max_epsilon or cfg.dp_target_epsilon)
        sigma = round_noise(cfg, num_examples)
        self.rate = sample_rate(num_examples, cfg.batch_size)
        self.steps = cfg.local_epochs * steps_per_epoch(num_examples, cfg.batch_size)
        seeded = cfg.dp_randomness == "seeded"
        self.settings = DPSettings(
            sigma, float(cfg.dp_max_grad_norm), self.delta, randomness=cfg.dp_randomness,
            noise_seed=derive_seed(cfg.seed, server_round, partition_id, NOISE_TAG) if seeded else None,
            # the seed plain SGD's shuffling uses (train_local): the batches of the old code
            sampler_seed=derive_seed(cfg.seed, server_round, partition_id) if seeded else None)

    @property
    def dpsgd(self) -> DPSGD:
        """What ``train_local`` takes: this round's settings and the node's accountant."""
        return DPSGD(self.settings, self.accountant)

    def _run_entries(self) -> list[Entry]:
        return [e for e in self.entries if e[3] == self.run_tag]

    def _epsilons(self, entries: list[Entry], delta: float) -> tuple[float, float]:
        """(epsilon of ``entries``, epsilon after this round's steps too) at ``delta``."""
        accountant = accountant_of(entries)
        return (epsilon_after(accountant, delta),
                epsilon_after(accountant, delta, noise_multiplier=self.settings.noise_multiplier,
                              rate=self.rate, steps=self.steps))

    def over_budget(self) -> str | None:
        """Why this round must not run (the run's cap would be exceeded), or None."""
        if self.max_epsilon <= 0:
            return None
        spent, after = self._epsilons(self._run_entries(), self.delta)
        if after <= self.max_epsilon * (1 + 1e-9):
            return None
        return (f"{wire.DP_OUT_OF_BUDGET}: epsilon {spent:.3f} spent; this round would "
                f"reach {after:.3f} > {self.max_epsilon:g} (dp-max-epsilon, else "
                "dp-target-epsilon)")

    def policy_refusal(self) -> str | None:
        """Why the node's own policy refuses this round (too little noise, or its total
        spend over every run would pass its cap), or None."""
        if self.policy is None:
            return None
        if reason := self.policy.refuse_noise(self.settings.noise_multiplier):
            return reason
        spent, after = self._epsilons(self.entries, self.policy.delta)
        return self.policy.refuse_spend(spent, after)

    def finish(self) -> dict[str, float]:
        """Record this round's steps in the ledger, save it, return the reply's metrics
        (the run's epsilon at the run's delta)."""
        taken = _total([(s, q, k, "") for s, q, k in self.accountant.history]) - self._steps_before
        if taken > 0:
            self.entries.append((self.settings.noise_multiplier, self.rate, taken, self.run_tag))
        save_ledger(self.state, self.entries, self.scope, path=self.path)
        spent = epsilon_after(accountant_of(self._run_entries()), self.delta)
        return {wire.DP_EPSILON: spent, wire.DP_DELTA: self.delta,
                wire.DP_NOISE: self.settings.noise_multiplier,
                wire.DP_CLIP: self.settings.max_grad_norm}
