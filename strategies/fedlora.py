"""FedLoRA: federated low-rank adaptation of a pretrained base; only the adapters travel.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022)
freezes a pretrained weight W0 (d_out x d_in) and trains a rank-r update beside it:

    W = W0 + (alpha / r) B A,     A: r x d_in (random init),  B: d_out x r (zero init)

(for a convolution A is a convolution with r output channels and B a 1x1 convolution,
as in Hugging Face ``peft``, which this module uses for every adapter: nothing here is a
hand-written LoRA layer). In the federation every node holds the same pretrained base;
the server sends, and each client trains and returns, only the adapters (and, with
``lora-train-head``, the classifier head, trained in full: a new task needs a new head).
The server averages them as FedAvg averages a model, A and B separately (as FedIT does:
Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP
2024):

    A <- sum_i (n_i / n) A_i,      B <- sum_i (n_i / n) B_i

Note that the merged update is then (alpha / r) mean(B_i) mean(A_i), not the mean of the
clients' (alpha / r) B_i A_i: averaging the factors is not averaging their product
(Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024, call
this the discordance of FedIT and freeze A to remove it; not done here). Because the
aggregate is the weighted mean of the replies' arrays, SecAgg+ and user-level DP apply
as they do to FedAvg, on far fewer values.

The base is a file (``python -m fl_app.pretrain`` makes one: central training on data the
clients do not hold), named by run-config ``lora-base`` on the server and, on a deployed
node, by node-config ``lora-base`` (a server does not choose which file a device reads;
in simulation the clients use the server's file). Its SHA-256 travels with every
message: a node whose base differs refuses the message, naming the key, since adapters
trained on another base mean nothing on this one. The base itself never travels. The
run's recorded config carries the checksum too, so a resume against another base is
refused. The final model the server saves is the merged one (base + scaled B A, and the
trained head): a plain model of the run's kind.

``peft`` is imported only when a LoRA model is built (it pulls in ``transformers``:
seconds of imports that runs of the other strategies should not pay).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fl_common import wire
from fl_common.atomic import write_atomic

from .fedper import parametrised_layers
from .spec import ClientLocal, StrategySpec, Traits, fedavg_kwargs

KEYS = ("lora-rank", "lora-alpha", "lora-target-modules", "lora-train-head", "lora-base")
BASE_KEY = "lora-base"  # run config (the server's file) and node config (a deployed node's)
BASE_SHA = "lora-base-sha256"  # server -> client (round config), and the recorded config
BASE_PATH = "lora-base-path"  # server -> client, simulation only: the server's file
AUTO = "auto"
INIT_TAG = 0x10A  # separates the adapters' initial draw from every other use of `seed`
PRETRAIN_COMMAND = "python -m fl_app.pretrain --dataset <dataset> --model <model> --out <file>"
_PEFT_ATTR = "_fl_peft_model"  # the PeftModel around a model the payload prepared
_SHA_ATTR = "_fl_lora_base_sha256"  # the checksum of the base it was prepared with


class BaseRefused(ValueError):
    """This node cannot use the run's base: missing, unreadable, or another one."""


# ------------------------------------------------------------------------- the base
def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_base(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """Write a pretrained base (a plain state_dict and what made it) atomically as an npz
    without pickles; returns its SHA-256."""
    arrays = {f"w/{k}": v.detach().cpu().numpy() for k, v in state.items()}

    def write(handle) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, __meta__=np.array(json.dumps(meta, sort_keys=True)), **arrays)
        handle.write(buffer.getvalue())

    write_atomic(Path(path), write)
    return sha256_file(path)


def read_base(path: str | Path, key: str = BASE_KEY) -> tuple[dict[str, np.ndarray], dict]:
    """(the base's state_dict as arrays, its metadata); BaseRefused naming ``key``."""
    state, meta, _ = read_base_checked(path, key)
    return state, meta


def read_base_checked(path: str | Path, key: str = BASE_KEY
                      ) -> tuple[dict[str, np.ndarray], dict, str]:
    """(state, metadata, SHA-256) from one read of the file: the checksum is of the very
    bytes whose weights are loaded (a file replaced in between cannot slip through)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BaseRefused(f"'{key}' = {str(path)!r} is not a file; make a base with "
                          f"`{PRETRAIN_COMMAND}` and name it in '{key}'")
    try:
        raw = path.read_bytes()
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            meta = json.loads(str(data["__meta__"]))
            state = {name[2:]: data[name] for name in data.files if name.startswith("w/")}
    except (OSError, ValueError, KeyError) as err:
        raise BaseRefused(f"'{key}' = {str(path)!r} is not a base made by fl_app.pretrain "
                          f"({err})") from None
    return state, meta, hashlib.sha256(raw).hexdigest()


def check_base_fits(model: nn.Module, state: dict[str, np.ndarray], path: str,
                    key: str = BASE_KEY) -> None:
    """The base must have exactly the model's state_dict entries and shapes."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    if own != theirs:
        missing = sorted(set(own) - set(theirs))
        extra = sorted(set(theirs) - set(own))
        shapes = sorted(k for k in set(own) & set(theirs) if own[k] != theirs[k])
        raise BaseRefused(f"'{key}' = {path!r} does not fit the run's model (missing "
                          f"{missing[:4]}, unexpected {extra[:4]}, other shapes {shapes[:4]}); "
                          f"make one for this dataset and model with `{PRETRAIN_COMMAND}`")


# --------------------------------------------------------------------- the adapters
def target_modules(model: nn.Module, setting: str, train_head: bool) -> list[str]:
    """The modules that get adapters: ``lora-target-modules`` ("auto": every Linear and
    Conv layer but the head when the head trains, else every one); ValueError naming
    the key and what is accepted."""
    layers = parametrised_layers(model)
    head = layers[-1]
    if setting == AUTO:
        targets = layers[:-1] if train_head else layers
        if not targets:
            raise ValueError(f"Run config 'lora-target-modules' = \"auto\" leaves no layer for "
                             f"an adapter: this model's only layer {head!r} is the head, which "
                             "'lora-train-head' = true trains in full; set 'lora-train-head' = "
                             "false to put the adapter on it")
        return targets
    names = [n.strip() for n in str(setting).split(",") if n.strip()]
    unknown = [n for n in names if n not in layers]
    if unknown or not names:
        raise ValueError(f"Run config 'lora-target-modules' names {unknown or names}, which are "
                         f"not Linear or Conv layers of this model; accepted: \"auto\" or some "
                         f"of {layers}")
    if train_head and head in names:
        raise ValueError(f"Run config 'lora-target-modules' includes the head {head!r}, which "
                         "'lora-train-head' = true trains in full; drop it from the list or set "
                         "'lora-train-head' = false")
    return names


def head_module(model: nn.Module) -> str:
    return parametrised_layers(model)[-1]


def trainable(model: nn.Module) -> ArrayRecord:
    """The arrays that travel: the parameters a prepared model trains."""
    return ArrayRecord({name: Array(p.detach().cpu().numpy().copy())
                        for name, p in model.named_parameters() if p.requires_grad})


@dataclass(frozen=True)
class LoRAAdapters:
    """FedLoRA's payload: the adapters (and the head) both ways; the base on every node."""

    rank: int
    alpha: float
    targets: str  # run-config lora-target-modules
    train_head: bool
    base: str  # the server's base file (run-config lora-base)
    init_seed: int
    description: str = "the LoRA adapters (and the head) both ways; the pretrained base stays on every node"

    # ---- preparing a model: base weights in, adapters injected (peft), base frozen
    def lora_config(self, model: nn.Module):
        try:
            from peft import LoraConfig
        except ImportError:
            raise BaseRefused("strategy \"fedlora\" needs Hugging Face peft on every node: "
                              "pip install 'fl-app[lora]' (peft==0.21.2)") from None

        targets = target_modules(model, self.targets, self.train_head)
        return LoraConfig(
            r=int(self.rank), lora_alpha=float(self.alpha), lora_dropout=0.0, bias="none",
            # a full match of module names: "features.0" must not also match "x.features.0"
            target_modules="^(" + "|".join(re.escape(t) for t in targets) + ")$",
            modules_to_save=[head_module(model)] if self.train_head else None,
        )

    def prepare(self, model: nn.Module, path: str, expected_sha: str | None = None,
                key: str = BASE_KEY) -> None:
        """Load the base at ``path`` into ``model`` and inject the adapters in place (the
        model's forward then runs base + adapters; only the adapters and the head train).
        With ``expected_sha``, a base with another checksum is refused."""
        if model.__dict__.get(_SHA_ATTR) is not None:
            return
        state, _, sha = read_base_checked(path, key)
        if expected_sha is not None and sha != expected_sha:
            raise BaseRefused(f"this node's '{key}' = {path!r} has SHA-256 {sha[:16]}..., but "
                              f"the run's base has {expected_sha[:16]}...: adapters trained on "
                              "another base do not apply; give the node the run's base file")
        check_base_fits(model, state, path, key)
        config = self.lora_config(model)  # before the weights change: names checked first
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
        from peft import get_peft_model

        with torch.random.fork_rng(devices=[]):  # A's random init, the same on every node
            torch.manual_seed(int(self.init_seed))
            peft_model = get_peft_model(model, config)
        object.__setattr__(model, _PEFT_ATTR, peft_model)  # not a submodule: no state_dict entry
        object.__setattr__(model, _SHA_ATTR, sha)

    # ---- the Payload protocol
    def check(self, model: nn.Module) -> None:
        target_modules(model, self.targets, self.train_head)
        state, _ = read_base(self.base)
        check_base_fits(model, state, self.base)

    def initial(self, model: nn.Module) -> ArrayRecord:
        self.prepare(model, self.base)
        return trainable(model)

    def round_config(self) -> dict[str, str]:
        """What every message carries besides the run config: the base's checksum, and
        (used in simulation only) where the server's base is."""
        path = str(Path(self.base).expanduser().resolve())
        return {BASE_SHA: sha256_file(path), BASE_PATH: path}

    def load(self, model: nn.Module, arrays: ArrayRecord, local: ClientLocal | None = None) -> None:
        if local is None:  # the server
            self.prepare(model, self.base)
        else:
            config = local.content.get(wire.CONFIG) if local.content is not None else None
            expected = str(config[BASE_SHA]) if config is not None and BASE_SHA in config else None
            path = local.node_files.get(BASE_KEY)
            if not path:
                raise BaseRefused(f"this node has no pretrained base for FedLoRA: start the "
                                  f"SuperNode with --node-config \"{BASE_KEY}='<the run's base "
                                  f"file>'\"")
            if expected is None:
                raise BaseRefused(f"the message carries no '{BASE_SHA}': the server did not say "
                                  "which base the adapters belong to")
            self.prepare(model, path, expected, key=f"node config {BASE_KEY}")
        expected_keys = sorted(trainable(model).keys())
        if sorted(arrays.keys()) != expected_keys:
            raise ValueError(f"FedLoRA: the message carries {sorted(arrays.keys())[:4]}..., not "
                             f"the adapters {expected_keys[:4]}... ({len(expected_keys)} arrays)")
        model.load_state_dict(arrays.to_torch_state_dict(), strict=False)

    def reply(self, model: nn.Module) -> ArrayRecord:
        return trainable(model)

    def final_state(self, model: nn.Module, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """The merged model: base + (alpha / r) B A in every adapted layer, the trained
        head; the plain model's state_dict keys."""
        self.load(model, arrays)
        merged = copy.deepcopy(model.__dict__[_PEFT_ATTR]).merge_and_unload()
        return {k: v.detach().cpu().clone() for k, v in merged.state_dict().items()}


def _payload(cfg) -> LoRAAdapters:
    from fl_common.randomness import derive_seed

    return LoRAAdapters(int(cfg.lora_rank), float(cfg.lora_alpha), str(cfg.lora_target_modules),
                        bool(cfg.lora_train_head), str(cfg.lora_base),
                        derive_seed(cfg.seed, INIT_TAG))


def _check(cfg) -> None:
    if not str(cfg.lora_base).strip():
        raise ValueError(f"Run config 'strategy' = \"fedlora\" needs a pretrained base: set "
                         f"'{BASE_KEY}' to a file made with `{PRETRAIN_COMMAND}`")
    path = Path(str(cfg.lora_base)).expanduser()
    if not path.is_file():
        raise ValueError(f"Run config '{BASE_KEY}' = {str(cfg.lora_base)!r} is not a file; make "
                         f"one with `{PRETRAIN_COMMAND}`")


class FedLoRA(FedAvg):
    """FedAvg over the adapter arrays (the only ones that travel)."""

    def __init__(self, *, rank: int, alpha: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rank, self.alpha = rank, alpha

    def summary(self) -> None:
        from logging import INFO

        from flwr.supercore import log

        log(INFO, "\t├──> FedLoRA: rank-%d adapters (alpha %g) on a pretrained base; the "
                  "adapters are averaged as FedAvg averages, the base never travels",
            self.rank, self.alpha)
        super().summary()


SPEC = StrategySpec(
    name="fedlora",
    reference="Hu et al., LoRA, ICLR 2022; federated as in Zhang et al., FedIT, ICASSP 2024 "
              "(adapters averaged factor by factor); adapters by Hugging Face peft",
    build=lambda b: FedLoRA(**fedavg_kwargs(b.cfg), rank=int(b.cfg.lora_rank),
                            alpha=float(b.cfg.lora_alpha)),
    traits=Traits(linear=True, secagg=True, user_dp=True, sample_dp=True),
    payload=_payload,
    check=_check,
)
