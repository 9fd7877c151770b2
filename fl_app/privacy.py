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
import re
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

from . import wire
from fl_common.randomness import RANDOMNESS_MODES, derive_seed, secret_torch_generator

from .atomic import write_atomic
from .training import model_device

if TYPE_CHECKING:  # pragma: no cover
    from .config import RunConfig

STATE_HISTORY = "dp-history"  # Context.state: the accountant's history and its run tag
NOISE_TAG = 0xD9  # separates the noise seed from every other use of `seed`
# How Opacus computes per-sample gradients: "hooks" (its default, used here), "functorch"
# or "ew" (expanded weights). experiments/benchmark_dp.py measures them: "ew" was ~10%
# faster but fails on an empty Poisson batch ("Batch size must be positive"), which
# Poisson sampling produces; "functorch" was slower (docs/benchmarks.md).
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
    grad_sample_mode: str = "hooks"  # Opacus's per-sample gradient mode (GRAD_SAMPLE_MODES)

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
def accountant_file(state_dir: str, run_tag: str, partition_id: int) -> Path:
    """Where a node keeps its accountant history on disk: keyed by run and partition,
    since node ids change when a SuperNode restarts."""
    safe = re.sub(r"[^A-Za-z0-9._=+-]", "_", run_tag)
    return Path(state_dir).expanduser() / f"dp-accountant-{safe}-p{int(partition_id)}.json"


def _history_total(history: list) -> int:
    return sum(int(h[2]) for h in history)


def _read_file(path: Path, run_tag: str) -> list:
    if not path.exists():
        return []
    try:
        payload = json.loads(path.read_text())
        if payload.get("run-tag") != run_tag:
            return []
        return [(float(s), float(q), int(k)) for s, q, k in payload["history"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"Cannot read the privacy accountant state {path} ({err}); refusing "
                         "to train without it, since the spend would be under-counted. "
                         "Restore the file or start a new run") from None


def load_accountant(state: RecordDict, run_tag: str, *, path: Path | None = None) -> RDPAccountant:
    """The accountant with this node's history in this run (empty for a new run).

    From the node's ``Context.state`` and, with ``path`` (the node config's
    ``state-dir``), from disk: a SuperNode that restarted has lost its Context.state but
    not the file. If both exist the longer history wins, so the spend is never
    under-counted.
    """
    accountant = RDPAccountant()
    history = []
    record = state.get(STATE_HISTORY)
    if record is not None and record.get("run-tag") == run_tag:
        history = [(float(s), float(q), int(k)) for s, q, k in
                   zip(record["sigma"], record["q"], record["steps"])]
    if path is not None:
        on_disk = _read_file(path, run_tag)
        if _history_total(on_disk) > _history_total(history):
            history = on_disk
    accountant.history = history
    return accountant


def save_accountant(state: RecordDict, accountant: RDPAccountant, run_tag: str, *,
                    path: Path | None = None) -> None:
    """Keep the history in Context.state and, with ``path``, on disk (written to a
    temporary file, flushed, then renamed: a crash leaves the old file or the new one)."""
    history = accountant.history
    state[STATE_HISTORY] = ConfigRecord({
        "run-tag": run_tag,
        "sigma": [float(h[0]) for h in history],
        "q": [float(h[1]) for h in history],
        "steps": [int(h[2]) for h in history],
    })
    if path is not None:
        payload = {"run-tag": run_tag, "history": [[float(s), float(q), int(k)] for s, q, k in history]}
        write_atomic(path, lambda handle: handle.write(json.dumps(payload).encode()))


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

    def batches(self, num_examples: int):
        """One epoch of Poisson-sampled index batches (Opacus's sampler), drawn with this
        round's sampling generator (secret with ``randomness = "secure"``)."""
        return iter(UniformWithReplacementSampler(num_samples=num_examples,
                                                  sample_rate=self.rate, generator=self.sampling))

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, after_privatize=None) -> None:
        if self.optimizer.pre_step():  # clip, noise, scale; the accountant counts the step
            if after_privatize is not None:
                after_privatize(self.model)
            self.optimizer.original_optimizer.step()

    def close(self) -> None:
        """Remove Opacus's hooks and per-parameter attributes from ``model``."""
        self.module._close()


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
    """Sample-level DP for one client round: its accountant (from Context.state and the
    node's ``state-dir``), its sigma, the budget check, and the reply's DP metrics."""

    def __init__(self, cfg: "RunConfig", state: RecordDict, state_dir: str | None, *, run_tag: str,
                 partition_id: int, num_examples: int, server_round: int) -> None:
        self.state, self.run_tag = state, run_tag
        self.path = accountant_file(state_dir, run_tag, partition_id) if state_dir else None
        self.accountant = load_accountant(state, run_tag, path=self.path)
        self.delta, self.max_epsilon = float(cfg.dp_delta), float(cfg.dp_max_epsilon)
        sigma = round_noise(cfg, num_examples)
        self.rate = sample_rate(num_examples, cfg.batch_size)
        self.steps = cfg.local_epochs * steps_per_epoch(num_examples, cfg.batch_size)
        seeded = cfg.dp_randomness == "seeded"
        self.settings = DPSettings(
            sigma, float(cfg.dp_max_grad_norm), self.delta, randomness=cfg.dp_randomness,
            noise_seed=derive_seed(cfg.seed, server_round, partition_id, NOISE_TAG) if seeded else None,
            # the seed plain SGD's shuffling uses (train_local): the batches of the old code
            sampler_seed=derive_seed(cfg.seed, server_round, partition_id) if seeded else None)

    def over_budget(self) -> str | None:
        """Why this round must not run (``dp-max-epsilon`` would be exceeded), or None."""
        if self.max_epsilon <= 0:
            return None
        after = epsilon_after(self.accountant, self.delta,
                              noise_multiplier=self.settings.noise_multiplier,
                              rate=self.rate, steps=self.steps)
        if after <= self.max_epsilon:
            return None
        spent = epsilon_after(self.accountant, self.delta)
        return (f"{wire.DP_OUT_OF_BUDGET}: epsilon {spent:.3f} spent; this round would "
                f"reach {after:.3f} > dp-max-epsilon {self.max_epsilon:g}")

    def finish(self) -> dict[str, float]:
        """Save the history (the round's steps are in it) and return the reply's metrics."""
        save_accountant(self.state, self.accountant, self.run_tag, path=self.path)
        return {wire.DP_EPSILON: float(self.accountant.get_epsilon(self.delta)),
                wire.DP_DELTA: self.delta, wire.DP_NOISE: self.settings.noise_multiplier,
                wire.DP_CLIP: self.settings.max_grad_norm}
