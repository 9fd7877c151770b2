"""The run config, read once at the boundary into a frozen, validated dataclass.

The defaults live in one place, ``[tool.flwr.app.config]`` of pyproject.toml; Flower
merges them with ``flwr run -c ...`` overrides and hands the result to both apps as
``context.run_config``. ``RunConfig.from_mapping`` checks every key (unknown keys,
missing keys, types and ranges) and raises ``ValueError`` naming the key and what is
accepted, before any training starts. Clients rebuild the same object from the JSON the
server sends each round (``wire.RUN_CONFIG``), so a sweep can change it between runs.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import strategies
from partitions import PARTITIONERS, DataConfig, resolve_source

from fl_common.randomness import RANDOMNESS_MODES
from strategies.spec import WHOLE_MODEL, effective_server_lr

from .attacks import ATTACKS
from .faults import FAULT_KINDS
from .model import MODELS
from .training import DEVICES

AUTO = "auto"
INIT_SHA = "init-from-sha256"  # the recorded config: the file the model started from
# DP keys and their defaults (pyproject.toml; a test keeps the two equal): with dp = false
# any other value is a mistake the user should hear about.
DP_MODES = ("sample", "user")
DP_DEFAULTS = {"dp_mode": "sample", "dp_randomness": "secure", "dp_noise_multiplier": 1.0, "dp_max_grad_norm": 1.0, "dp_delta": 1e-5,
               "dp_target_epsilon": 0.0, "dp_max_epsilon": 0.0}
SECAGG_DEFAULTS = {"secagg_num_shares": "auto", "secagg_reconstruction_threshold": "auto",
                   "secagg_clipping_range": 8.0, "secagg_quantization_range": 2**22,
                   "secagg_max_weight": AUTO, "secagg_timeout": 600.0}
# Largest accepted 'max-num-examples': with at most 2**31 examples per reply, a float64
# sum of the weights of even a million replies stays exact and far from overflow.
MAX_NUM_EXAMPLES_LIMIT = 2**31 - 1
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


# ---------------------------------------------------------------------- the sections
class Section:
    """A group of run-config keys that validates itself (``__post_init__``): types,
    ranges and the rules among its own keys. Rules across sections are RunConfig's."""

    @classmethod
    def keys(cls) -> list[str]:
        return [_key(f.name) for f in fields(cls)]


@dataclass(frozen=True)
class TrainingSection(Section):
    """The rounds and each client's local training."""

    num_server_rounds: int
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    local_epochs: int
    batch_size: int
    lr: float
    momentum: float
    seed: int
    max_num_examples: int
    eval_finetune_epochs: int

    def __post_init__(self) -> None:
        _int("num-server-rounds", self.num_server_rounds, minimum=1)
        _unit_interval("fraction-train", self.fraction_train)
        _number("fraction-evaluate", self.fraction_evaluate)
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ValueError("Run config 'fraction-evaluate' must be a number in [0, 1] (0: no "
                             f"federated evaluation); got {self.fraction_evaluate!r}")
        _int("min-train-nodes", self.min_train_nodes, minimum=1)
        _int("local-epochs", self.local_epochs, minimum=1)
        _int("batch-size", self.batch_size, minimum=1)
        _positive("lr", self.lr)
        _fraction("momentum", self.momentum)
        _int("seed", self.seed, minimum=0)
        _int("max-num-examples", self.max_num_examples, minimum=1)
        _int("eval-finetune-epochs", self.eval_finetune_epochs, minimum=0)
        if self.max_num_examples > MAX_NUM_EXAMPLES_LIMIT:
            raise ValueError(f"Run config 'max-num-examples' must be an integer in [1, "
                             f"{MAX_NUM_EXAMPLES_LIMIT}]; got {self.max_num_examples!r}")


@dataclass(frozen=True)
class DataSection(Section):
    """The dataset and its federated split."""

    dataset: str
    partitioner: str
    alpha: float
    classes_per_partition: int
    shards_per_partition: int
    validation_fraction: float

    def __post_init__(self) -> None:
        _str("dataset", self.dataset)
        _choice("partitioner", self.partitioner, PARTITIONERS)
        _positive("alpha", self.alpha)
        _int("classes-per-partition", self.classes_per_partition, minimum=1)
        _int("shards-per-partition", self.shards_per_partition, minimum=1)
        _open_interval("validation-fraction", self.validation_fraction)
        resolve_source(self.dataset)  # unknown name or missing file


@dataclass(frozen=True)
class ModelSection(Section):
    model: str
    device: str
    init_from: str

    def __post_init__(self) -> None:
        _choice("model", self.model, MODELS)
        _choice("device", self.device, DEVICES)
        if not isinstance(self.init_from, str):
            raise ValueError("Run config 'init-from' must be a path to a pretrained model (a "
                             f"string; \"\" for the seeded initial model); got {self.init_from!r}")
        if self.init_from and not Path(self.init_from).expanduser().is_file():
            raise ValueError(f"Run config 'init-from' = {self.init_from!r} is not a file; make "
                             "one with `python -m fl_app.pretrain --dataset <dataset> --model "
                             "<model> --out <file>`")


@dataclass(frozen=True)
class StrategySection(Section):
    """The strategy and the keys of the algorithms (each used by the ones it names)."""

    strategy: str
    proximal_mu: float
    scaffold_control_variate: str
    scaffold_weighting: str
    server_lr: float | str
    server_momentum: float
    beta_1: float
    beta_2: float
    tau: float
    trim_fraction: float
    num_malicious: int
    num_selected: int | str
    personal_layers: int | str
    lora_rank: int
    lora_alpha: float
    lora_target_modules: str
    lora_train_head: bool
    lora_base: str

    def __post_init__(self) -> None:
        _choice("strategy", self.strategy, strategies.names())
        _number("proximal-mu", self.proximal_mu)
        if self.proximal_mu < 0:
            raise ValueError(f"Run config 'proximal-mu' must be a number >= 0; got {self.proximal_mu!r}")
        _choice("scaffold-control-variate", self.scaffold_control_variate, strategies.SCAFFOLD_VARIATES)
        _choice("scaffold-weighting", self.scaffold_weighting, strategies.SCAFFOLD_WEIGHTINGS)
        if self.server_lr != AUTO:
            _positive("server-lr", self.server_lr, also=f'or the string "{AUTO}"')
        _fraction("server-momentum", self.server_momentum)
        _fraction("beta-1", self.beta_1)
        _fraction("beta-2", self.beta_2)
        _positive("tau", self.tau)
        _number("trim-fraction", self.trim_fraction)
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"Run config 'trim-fraction' must be in [0, 0.5); got {self.trim_fraction!r}")
        _int("num-malicious", self.num_malicious, minimum=0)
        if self.num_selected != AUTO:
            _int("num-selected", self.num_selected, minimum=1, also=f'or the string "{AUTO}" (n - f)')
        if isinstance(self.personal_layers, str):
            if not self.personal_layers.strip():
                raise ValueError("Run config 'personal-layers' must be an integer >= 0 (the last "
                                 "k parametrised layers) or module names separated by commas; "
                                 "got ''")
        else:
            _int("personal-layers", self.personal_layers, minimum=0,
                 also="or module names separated by commas")
        _int("lora-rank", self.lora_rank, minimum=1)
        _positive("lora-alpha", self.lora_alpha)
        if not isinstance(self.lora_target_modules, str) or not self.lora_target_modules.strip():
            raise ValueError("Run config 'lora-target-modules' must be \"auto\" or module "
                             f"names separated by commas; got {self.lora_target_modules!r}")
        _bool("lora-train-head", self.lora_train_head)
        if not isinstance(self.lora_base, str):
            raise ValueError("Run config 'lora-base' must be a path to a pretrained base (a "
                             f"string; \"\" when unused); got {self.lora_base!r}")

    @property
    def spec(self):  # -> strategies.StrategySpec
        return strategies.spec(self.strategy)


@dataclass(frozen=True)
class AttackSection(Section):
    """Simulated Byzantine clients (a test facility, simulation only)."""

    attack: str
    num_attackers: int
    attack_scale: float
    attack_std: float
    attack_epsilon: float

    def __post_init__(self) -> None:
        _choice("attack", self.attack, ATTACKS)
        _int("num-attackers", self.num_attackers, minimum=0)
        if self.attack != "none" and self.num_attackers < 1:
            raise ValueError(f"Run config 'num-attackers' must be >= 1 when 'attack' = "
                             f"{self.attack!r}; got {self.num_attackers!r}")
        _positive("attack-scale", self.attack_scale)
        _positive("attack-std", self.attack_std)
        _positive("attack-epsilon", self.attack_epsilon)


@dataclass(frozen=True)
class DPSection(Section):
    """Differential privacy (docs/privacy.md)."""

    dp: bool
    dp_mode: str
    dp_randomness: str
    dp_noise_multiplier: float
    dp_max_grad_norm: float
    dp_delta: float
    dp_target_epsilon: float
    dp_max_epsilon: float

    def __post_init__(self) -> None:
        if not isinstance(self.dp, bool):
            raise ValueError(f"Run config 'dp' must be true or false; got {self.dp!r}")
        if not self.dp:
            changed = [_key(name) for name, default in DP_DEFAULTS.items()
                       if getattr(self, name) != default]
            if changed:
                raise ValueError(f"Run config key(s) {changed} only take effect with dp = true; "
                                 f"set dp = true, or leave them at their defaults")
            return
        _choice("dp-mode", self.dp_mode, DP_MODES)
        _choice("dp-randomness", self.dp_randomness, RANDOMNESS_MODES)
        if self.dp_mode == "user" and self.dp_max_epsilon != 0:
            raise ValueError("Run config 'dp-max-epsilon' is a per-client budget of dp-mode "
                             "\"sample\"; with dp-mode \"user\" bound the run's spend with "
                             "'dp-target-epsilon' instead")
        _number("dp-noise-multiplier", self.dp_noise_multiplier)
        if self.dp_noise_multiplier < 0:
            raise ValueError("Run config 'dp-noise-multiplier' (sigma) must be a number >= 0; "
                             f"got {self.dp_noise_multiplier!r}")
        _positive("dp-max-grad-norm", self.dp_max_grad_norm)
        _open_interval("dp-delta", self.dp_delta)
        _number("dp-target-epsilon", self.dp_target_epsilon)
        _number("dp-max-epsilon", self.dp_max_epsilon)
        for key, value in (("dp-target-epsilon", self.dp_target_epsilon),
                           ("dp-max-epsilon", self.dp_max_epsilon)):
            if value < 0:
                raise ValueError(f"Run config '{key}' must be a number > 0, or 0 for none; "
                                 f"got {value!r}")
        if self.dp_target_epsilon == 0 and self.dp_noise_multiplier == 0:
            raise ValueError("Run config 'dp-noise-multiplier' = 0 adds no noise: no privacy. "
                             "Set it > 0, or set 'dp-target-epsilon'")
        if 0 < self.dp_max_epsilon < self.dp_target_epsilon:
            raise ValueError(f"Run config 'dp-max-epsilon' = {self.dp_max_epsilon} is below "
                             f"'dp-target-epsilon' = {self.dp_target_epsilon}: the last rounds "
                             "could never run")


@dataclass(frozen=True)
class SecAggSection(Section):
    """Secure aggregation, SecAgg+ (docs/secure-aggregation.md)."""

    secagg: bool
    secagg_num_shares: int | str
    secagg_reconstruction_threshold: int | str
    secagg_clipping_range: float
    secagg_quantization_range: int
    secagg_max_weight: float | str
    secagg_timeout: float

    def __post_init__(self) -> None:
        if not isinstance(self.secagg, bool):
            raise ValueError(f"Run config 'secagg' must be true or false; got {self.secagg!r}")
        if not self.secagg:
            changed = [_key(name) for name, default in SECAGG_DEFAULTS.items()
                       if getattr(self, name) != default]
            if changed:
                raise ValueError(f"Run config key(s) {changed} only take effect with secagg = "
                                 "true; set secagg = true, or leave them at their defaults")
            return
        if self.secagg_max_weight != AUTO:
            _positive("secagg-max-weight", self.secagg_max_weight, also=f'or the string "{AUTO}"')
        if self.secagg_num_shares != AUTO:
            _int("secagg-num-shares", self.secagg_num_shares, minimum=3,
                 also=f'or the string "{AUTO}" (from the clients sampled)')
        if self.secagg_reconstruction_threshold != AUTO:
            _int("secagg-reconstruction-threshold", self.secagg_reconstruction_threshold,
                 minimum=2, also=f'or the string "{AUTO}" (more than half the shares)')
        _positive("secagg-clipping-range", self.secagg_clipping_range)
        _int("secagg-quantization-range", self.secagg_quantization_range, minimum=2)
        _positive("secagg-timeout", self.secagg_timeout)


@dataclass(frozen=True)
class ResultsSection(Section):
    """Where a run is recorded, and resuming it."""

    results_dir: str
    run_name: str
    sweep_file: str
    checkpoint: bool
    resume_from: str

    def __post_init__(self) -> None:
        _str("results-dir", self.results_dir)
        if not isinstance(self.run_name, str) or (self.run_name and not _RUN_NAME.match(self.run_name)):
            raise ValueError(
                "Run config 'run-name' must be empty (automatic) or letters, digits and "
                f"'._=+-' not starting with a symbol; got {self.run_name!r}"
            )
        if not isinstance(self.sweep_file, str):
            raise ValueError(f"Run config 'sweep-file' must be a path string; got {self.sweep_file!r}")
        if self.sweep_file and not Path(self.sweep_file).expanduser().is_file():
            raise ValueError(f"Run config 'sweep-file': no such file: {self.sweep_file!r}")
        if not isinstance(self.checkpoint, bool):
            raise ValueError(f"Run config 'checkpoint' must be true or false; got {self.checkpoint!r}")
        if not isinstance(self.resume_from, str):
            raise ValueError(f"Run config 'resume-from' must be a path string (empty: a new run); "
                             f"got {self.resume_from!r}")
        if self.resume_from and not self.checkpoint:
            raise ValueError("Run config 'resume-from' needs 'checkpoint' = true: the resumed run "
                             "must go on checkpointing (and its clients on keeping their state)")
        if self.resume_from and self.sweep_file:
            raise ValueError("Run config 'resume-from' resumes one run; with 'sweep-file', submit "
                             "the sweep again instead: it resumes its interrupted entries from "
                             "their checkpoints and skips the finished ones")


@dataclass(frozen=True)
class FaultSection(Section):
    """Test facilities for failures (simulation only, off by default)."""

    fail_after_round: int
    round_timeout: float
    fault_rate: float
    fault_kind: str

    def __post_init__(self) -> None:
        _int("fail-after-round", self.fail_after_round, minimum=0)
        _positive("round-timeout", self.round_timeout)
        _choice("fault-kind", self.fault_kind, FAULT_KINDS)
        _number("fault-rate", self.fault_rate)
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"Run config 'fault-rate' must be in [0, 1]; got {self.fault_rate!r}")
        if (self.fault_rate > 0) != (self.fault_kind != "none"):
            raise ValueError(f"Run config 'fault-rate' = {self.fault_rate!r} and 'fault-kind' = "
                             f"{self.fault_kind!r}: set both (a rate > 0 and a kind in "
                             f"{list(FAULT_KINDS[1:])}) or neither")


# In this order the sections validate (and the keys are listed).
SECTIONS: dict[str, type[Section]] = {
    "strategy": StrategySection, "training": TrainingSection, "data": DataSection,
    "model": ModelSection, "attack": AttackSection, "dp": DPSection, "secagg": SecAggSection,
    "results": ResultsSection, "faults": FaultSection,
}
_SECTION_OF = {f.name: name for name, cls in SECTIONS.items() for f in fields(cls)}


def _largest_f(min_replies, sampled: int) -> int:
    """The largest number of attackers a robust rule tolerates with ``sampled`` replies."""
    f = 0
    while min_replies(f + 1) <= sampled:
        f += 1
    return f


@dataclass(frozen=True)
class RunConfig:
    """Every run-config key of the app (kebab-case in TOML, snake_case here), in
    sections that validate themselves (``cfg.sections["dp"]``), read flat as before
    (``cfg.dp_delta``); the rules across sections are below, asking the strategy's spec."""

    sections: Mapping[str, Section]

    def __getattr__(self, name: str) -> Any:
        section = _SECTION_OF.get(name)
        if section is None or name == "sections":
            raise AttributeError(f"RunConfig has no key {name!r}")
        return getattr(self.sections[section], name)

    # ------------------------------------------------------------------ construction
    @classmethod
    def keys(cls) -> list[str]:
        return [key for section in SECTIONS.values() for key in section.keys()]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "RunConfig":
        """Validate a full run config (kebab-case keys) and build it, section by section."""
        expected = cls.keys()
        unknown = sorted(set(mapping) - set(expected))
        if unknown:
            raise ValueError(f"Unknown run-config key(s) {unknown}; accepted keys: {expected}")
        missing = [k for k in expected if k not in mapping]
        if missing:
            raise ValueError(f"Missing run-config key(s) {missing}")
        return cls(dict({
            name: section(**{f.name: mapping[_key(f.name)] for f in fields(section)})
            for name, section in SECTIONS.items()}))

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        return cls.from_mapping(json.loads(text))

    def to_dict(self) -> dict[str, Any]:
        return {_key(k): v for section in self.sections.values() for k, v in asdict(section).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **overrides: Any) -> "RunConfig":
        """A new, re-validated config with kebab-case overrides."""
        return RunConfig.from_mapping({**self.to_dict(), **overrides})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunConfig) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.to_json())

    # ------------------------------------------------------------------ rules across sections
    def __post_init__(self) -> None:
        traits = strategies.spec(self.strategy).traits
        if traits.min_replies is not None:  # strategy x training
            need = traits.min_replies(self.num_malicious)
            if self.min_train_nodes < need:
                raise ValueError(
                    f"Strategy {self.strategy!r} with 'num-malicious' = {self.num_malicious} "
                    f"needs at least {need} valid replies per round; 'min-train-nodes' = "
                    f"{self.min_train_nodes} would let rounds with fewer through. Set "
                    f"'min-train-nodes' >= {need}, which needs {need} or more clients sampled "
                    f"a round; with fewer, lower 'num-malicious' (at most "
                    + ", ".join(f"{_largest_f(traits.min_replies, n)} for {n}" for n in (10, 20))
                    + " clients sampled)"
                )
        if self.dp and self.dp_mode == "user" and not traits.user_dp:  # dp x strategy
            raise ValueError(
                f"Run config 'dp-mode' = \"user\" does not hold its guarantee with strategy "
                f"{self.strategy!r}: the server's noise is calibrated for the mean of the "
                f"clipped updates, which {traits.refusals.get('user_dp', 'it does not compute')}"
                f". Accepted with dp-mode \"user\": {strategies.with_trait('user_dp')}; or "
                "use dp-mode \"sample\", which works with every strategy")
        if self.secagg:
            self._check_secagg(traits)
        if self.init_from and strategies.spec(self.strategy).payload(self) is not WHOLE_MODEL:
            raise ValueError(  # init x strategy
                f"Run config 'init-from' starts the whole model from a file, but strategy "
                f"{self.strategy!r} does not send the whole model ("
                f"{strategies.spec(self.strategy).payload(self).description}): for fedlora name "
                "the base in 'lora-base'; with fedper the clients' personal layers would not "
                "start from it. Set 'init-from' = \"\"")
        if (check := strategies.spec(self.strategy).check) is not None:
            check(self)  # the algorithm's own cross-key rules

    def _check_secagg(self, traits) -> None:
        """secagg x strategy, dp, attack; then the protocol's own settings."""
        from strategies.secagg import settings_problems

        if not traits.secagg:
            raise ValueError(
                f"Run config 'secagg' = true cannot serve strategy {self.strategy!r}: "
                f"{traits.refusals.get('secagg', 'it is not a sum of the replies')}. "
                f"Accepted with secagg: {strategies.with_trait('secagg')}")
        if self.dp and self.dp_mode == "user":
            raise ValueError(
                "Run config 'secagg' = true with dp-mode \"user\" is not supported: the server's "
                "noise wrapper counts and checks individual clipped updates, which secure "
                "aggregation hides. Use dp-mode \"sample\" (each client's DP-SGD) with secagg")
        if self.attack != "none":
            raise ValueError(
                f"Run config 'attack' = {self.attack!r} with secagg = true: the simulated "
                "attacks measure robust aggregation rules, which need individual updates and "
                "cannot run under secure aggregation (and the omniscient ones rewrite "
                "individual replies on the server). Set attack = \"none\" or secagg = false")
        problems = settings_problems(self.secagg_settings(max_weight=1.0))
        if problems:
            raise ValueError(problems[0])

    def secagg_settings(self, max_weight: float, sampled: int | None = None):
        """The protocol's settings (strategies.secagg.SecAggSettings), ``max_weight``
        resolving ``secagg-max-weight = "auto"`` and ``sampled`` (the clients of a round)
        the shares and threshold (``strategies.secagg.auto_shares``); without ``sampled``
        (checks before the federation is known) "auto" is their value for large rounds."""
        from strategies.secagg import SecAggSettings, auto_shares

        weight = max_weight if self.secagg_max_weight == AUTO else float(self.secagg_max_weight)
        shares, threshold = auto_shares(self.secagg_num_shares, self.secagg_reconstruction_threshold,
                                        sampled)
        return SecAggSettings(num_shares=shares,
                     threshold=threshold,
                     clipping_range=float(self.secagg_clipping_range),
                     quantization_range=self.secagg_quantization_range,
                     max_weight=weight, timeout=float(self.secagg_timeout))

    # ------------------------------------------------------------------ derived views
    @property
    def data(self) -> DataConfig:
        return DataConfig(
            dataset=self.dataset,
            partitioner=self.partitioner,
            alpha=float(self.alpha),
            classes_per_partition=self.classes_per_partition,
            shards_per_partition=self.shards_per_partition,
            validation_fraction=float(self.validation_fraction),
            seed=self.seed,
        )

    @property
    def effective_server_lr(self) -> float:
        """``server-lr``, with ``"auto"`` replaced by the strategy's default."""
        return effective_server_lr(self, strategies.spec(self.strategy).traits)

    def resolved(self) -> dict[str, Any]:
        """The config as written to the results: "auto" replaced by the value used."""
        out = self.to_dict()
        out["server-lr"] = self.effective_server_lr
        if self.strategy == "fedlora":  # which base the adapters belong to (a resume checks it)
            from strategies.fedlora import BASE_SHA, sha256_file

            out[BASE_SHA] = sha256_file(Path(self.lora_base).expanduser())
        if self.init_from:  # which model the run started from
            from strategies.fedlora import sha256_file

            out[INIT_SHA] = sha256_file(Path(self.init_from).expanduser())
        return out

    def default_run_name(self, timestamp: str) -> str:
        source = resolve_source(self.dataset)
        data = self.dataset if source.kind in ("digits",) or self.dataset == "fashion-mnist" else (
            Path(source.location).stem if source.kind != "hub" else source.location.split("/")[-1]
        )
        split = self.partitioner
        if self.partitioner == "dirichlet":
            split += f"{self.alpha:g}"
        elif self.partitioner == "pathological":
            split += f"{self.classes_per_partition}"
        elif self.partitioner == "shard":
            split += f"{self.shards_per_partition}"
        return f"{self.strategy}-{data}-{split}-s{self.seed}-{timestamp}"


# ---------------------------------------------------------------------- checks
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(key: str, value: Any) -> None:
    if not _is_number(value) or value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"Run config '{key}' must be a finite number; got {value!r}")


def _positive(key: str, value: Any, also: str = "") -> None:
    if not _is_number(value) or not 0 < value < float("inf"):
        extra = f" {also}" if also else ""
        raise ValueError(f"Run config '{key}' must be a number > 0{extra}; got {value!r}")


def _fraction(key: str, value: Any) -> None:
    if not _is_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"Run config '{key}' must be a number in [0, 1); got {value!r}")


def _unit_interval(key: str, value: Any) -> None:
    if not _is_number(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"Run config '{key}' must be a number in (0, 1]; got {value!r}")


def _open_interval(key: str, value: Any) -> None:
    if not _is_number(value) or not 0.0 < value < 1.0:
        raise ValueError(f"Run config '{key}' must be a number in (0, 1); got {value!r}")


def _int(key: str, value: Any, minimum: int, also: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        extra = f" {also}" if also else ""
        raise ValueError(f"Run config '{key}' must be an integer >= {minimum}{extra}; got {value!r}")


def _bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Run config '{key}' must be true or false; got {value!r}")


def _str(key: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"Run config '{key}' must be a non-empty string; got {value!r}")


def _choice(key: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"Run config '{key}' must be one of {list(accepted)}; got {value!r}")


def default_run_config() -> dict[str, Any]:
    """The defaults of ``[tool.flwr.app.config]`` in the repository's pyproject.toml."""
    import tomllib

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    with pyproject.open("rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def load_sweep(base: RunConfig) -> list[RunConfig]:
    """The runs of ``sweep-file`` (a JSON list of overrides), each validated on ``base``.

    Every entry must set ``run-name`` (so a later sitting can skip finished runs) and may
    not set ``sweep-file``. All entries are validated before the first run starts.
    """
    if not base.sweep_file:
        return [base]
    path = Path(base.sweep_file).expanduser()
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"Run config 'sweep-file' {path} is not valid JSON: {err}") from err
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries) or not entries:
        raise ValueError(f"Run config 'sweep-file' {path} must hold a non-empty JSON list of objects")
    runs: list[RunConfig] = []
    names: set[str] = set()
    for i, entry in enumerate(entries):
        if "sweep-file" in entry:
            raise ValueError(f"sweep-file entry {i} may not set 'sweep-file'")
        if not entry.get("run-name"):
            raise ValueError(f"sweep-file entry {i} must set a non-empty 'run-name'")
        try:
            cfg = base.replace(**entry, **{"sweep-file": ""})
        except ValueError as err:
            raise ValueError(f"sweep-file entry {i} ({entry.get('run-name')}): {err}") from err
        if cfg.run_name in names:
            raise ValueError(f"sweep-file entry {i}: duplicate run-name {cfg.run_name!r}")
        names.add(cfg.run_name)
        runs.append(cfg)
    return runs
