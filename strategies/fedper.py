"""FedPer: personalization layers that never leave the client.

Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with Personalization
Layers", arXiv 1912.00818 (2019). The model is split into *base* layers, trained by
every client and averaged by the server exactly as FedAvg averages a whole model, and
*personal* layers (the last k), which each client trains on its own data and keeps:

    server:  x_base <- sum_i (n_i / n) y_i,base            (FedAvg on the base only)
    client:  (y_i,base, p_i) <- local SGD from (x_base, p_i);   p_i stays on the client

What travels is the spec's payload, ``PersonalLayers``: the server starts from, sends,
validates and averages the base arrays only; a client loads them beside its own
personal layers and replies with the base arrays only (the personal ones never appear
in a message: tests/test_fedper.py checks the keys). With k = 0 FedPer is FedAvg.

"Parametrised layers" are the model's ``Linear`` and ``Conv`` modules, in definition
order (normalization layers belong to the block they normalize and stay in the base):
for the CNN, k = 1 keeps the classifier's last ``Linear`` (the head), k = 2 both
classifier layers. ``personal-layers`` also accepts module names ("classifier.2").

The personal layers are the client's state: in ``Context.state`` and, with a state
folder, on disk (``fedper-<run>-p<partition>.npz``, written atomically), so they survive
a SuperNode restart and a resumed run. They follow SCAFFOLD's c_i rules
(``strategies/accepted.py``): a round's newly trained layers stay *pending* until the
server's accepted map (sent with every train and evaluate message, the client's own
entry only) says that round's reply went into an aggregate that stood; then they are
committed, else dropped (a lost or rejected reply, a skipped or rolled-back round, a
round interrupted by a crash: the resumed server's map never saw it, so the round trained
again starts from the same layers). The personal layers and the base stay a matched
pair: the base a client continues from is the one its committed layers were trained
with.

Evaluation is personalized: an evaluating client scores the global base *with its own
personal layers* on its own held-out data; the server records the weighted mean
(``val_accuracy``) and the spread across clients (``val_accuracy_std``). The server's
central test has no personal layers (its head is the initial one): it is recorded, and
logged as not a FedPer metric.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fl_common.atomic import safe_name, write_atomic

from .accepted import AcceptedMap
from .spec import ClientHalf, ClientInputs, ClientLocal, StrategySpec, Traits, fedavg_kwargs

KEY = "personal-layers"
SLOTS = ("committed", "pending")
STATE_LAYERS = ("fedper-personal", "fedper-pending")  # Context.state: the two slots' layers
STATE_ROUNDS = "fedper-rounds"  # Context.state: {run-tag, committed, pending} rounds
ACCEPTED_RECORD = "fedper-accepted"  # server -> client: member id -> last round used
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def parametrised_layers(model: nn.Module) -> list[str]:
    """The model's Linear and Conv modules, in definition order."""
    return [name for name, module in model.named_modules() if isinstance(module, LAYER_TYPES)]


def personal_modules(model: nn.Module, setting: int | str) -> list[str]:
    """The personal modules ``personal-layers`` names (the last k, or a list of names);
    ValueError naming the key and what is accepted."""
    layers = parametrised_layers(model)
    if isinstance(setting, int):
        if not 0 <= setting < len(layers):
            raise ValueError(f"Run config '{KEY}' = {setting} leaves nothing shared: this model has "
                             f"{len(layers)} parametrised layers {layers}; accepted: 0 to "
                             f"{len(layers) - 1}, or names of some of them")
        return layers[len(layers) - setting:] if setting else []
    names = [n.strip() for n in str(setting).split(",") if n.strip()]
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise ValueError(f"Run config '{KEY}' names {unknown}, which are not parametrised layers "
                         f"of this model; accepted: some of {layers}")
    if set(names) >= set(layers):
        raise ValueError(f"Run config '{KEY}' = {setting!r} makes every layer personal: nothing "
                         f"would be shared; accepted: a proper subset of {layers}")
    return names


def split_keys(model: nn.Module, setting: int | str) -> tuple[list[str], list[str]]:
    """(base keys, personal keys) of the model's state_dict."""
    personal = personal_modules(model, setting)
    keys = list(model.state_dict())
    mine = [k for k in keys if any(k.startswith(m + ".") for m in personal)]
    return [k for k in keys if k not in mine], mine


@dataclass(frozen=True)
class PersonalLayers:
    """FedPer's payload: the base layers both ways; the personal layers stay local."""

    setting: int | str
    description: str = "the base layers both ways; the personal layers stay on the client"

    def check(self, model: nn.Module) -> None:
        split_keys(model, self.setting)

    def initial(self, model: nn.Module) -> ArrayRecord:
        base, _ = split_keys(model, self.setting)
        state = model.state_dict()
        return ArrayRecord({k: Array(state[k].detach().cpu().numpy()) for k in base})

    def load(self, model: nn.Module, arrays: ArrayRecord, local: ClientLocal | None = None) -> None:
        base, personal = split_keys(model, self.setting)
        if sorted(arrays.keys()) != sorted(base):
            raise ValueError(f"FedPer: the message carries {sorted(arrays.keys())}, not the base "
                             f"layers {sorted(base)}")
        model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
        if local is not None:
            saved = load_personal(local)
            if saved is not None:
                if sorted(saved) != sorted(personal):
                    raise ValueError("FedPer: the saved personal layers do not match the model's")
                model.load_state_dict({k: torch.from_numpy(v) for k, v in saved.items()},
                                      strict=False)

    def reply(self, model: nn.Module) -> ArrayRecord:
        base, _ = split_keys(model, self.setting)
        state = model.state_dict()
        return ArrayRecord({k: Array(state[k].detach().cpu().numpy()) for k in base})

    def round_config(self) -> dict[str, str]:
        return {}

    def final_state(self, model: nn.Module, arrays: ArrayRecord) -> dict:
        """The base only: the personal layers are the clients' (there is no one model)."""
        return arrays.to_torch_state_dict()

    def personal(self, model: nn.Module) -> dict[str, np.ndarray]:
        _, personal = split_keys(model, self.setting)
        state = model.state_dict()
        return {k: state[k].detach().cpu().numpy().copy() for k in personal}


# ---------------------------------------------------------------------- client state
def personal_file(local: ClientLocal) -> Path | None:
    if not local.state_dir:
        return None
    return (Path(local.state_dir).expanduser()
            / f"fedper-{safe_name(local.run_tag)}-p{int(local.member_id)}.npz")


def _empty(run_tag: str) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    return ({"run-tag": run_tag, "committed": -1, "pending": -1},
            {"committed": {}, "pending": {}})


def _read_disk(path: Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["__meta__"]))
        slots: dict[str, dict[str, np.ndarray]] = {"committed": {}, "pending": {}}
        for name in data.files:
            if name != "__meta__":
                slot, key = name.split("/", 1)
                slots[slot][key] = data[name]
    return meta, slots


def _load(local: ClientLocal) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """(meta: run tag and the rounds of the committed and pending layers, the layers),
    from Context.state, or from disk when Context.state holds nothing of this run."""
    meta = local.state.get(STATE_ROUNDS)
    if meta is not None and meta.get("run-tag") == local.run_tag:
        slots = {slot: ({k: a.numpy() for k, a in local.state[name].items()}
                        if name in local.state else {})
                 for slot, name in zip(SLOTS, STATE_LAYERS)}
        return dict(meta), slots
    path = personal_file(local)
    if path is not None and path.exists():
        try:
            disk_meta, slots = _read_disk(path)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"FedPer: cannot read the personal layers in {path} ({err}); "
                             "restore the file or start a new run") from None
        if disk_meta.get("run-tag") == local.run_tag:
            return disk_meta, slots
    return _empty(local.run_tag)


def _store(local: ClientLocal, meta: dict, slots: dict[str, dict[str, np.ndarray]]) -> None:
    local.state[STATE_ROUNDS] = ConfigRecord({"run-tag": local.run_tag,
                                              "committed": int(meta["committed"]),
                                              "pending": int(meta["pending"])})
    for slot, name in zip(SLOTS, STATE_LAYERS):
        local.state[name] = ArrayRecord({k: Array(np.ascontiguousarray(v))
                                         for k, v in slots[slot].items()})
    path = personal_file(local)
    if path is not None:
        payload = {f"{slot}/{k}": v for slot in SLOTS for k, v in slots[slot].items()}
        header = json.dumps({k: meta[k] for k in ("run-tag", "committed", "pending")})

        def write(handle) -> None:
            buffer = io.BytesIO()
            np.savez(buffer, __meta__=np.array(header), **payload)
            handle.write(buffer.getvalue())

        write_atomic(path, write)


def load_personal(local: ClientLocal) -> dict[str, np.ndarray] | None:
    """The committed personal layers, after resolving the pending ones by the message's
    accepted entry (strategies/accepted.py): committed if the server used the round that
    trained them, dropped otherwise. None: nothing committed yet in this run (the model's
    own initial layers)."""
    meta, slots = _load(local)
    if int(meta["pending"]) >= 0 and local.content is not None:
        entry = local.content.get(ACCEPTED_RECORD)
        used = entry.get(str(int(local.member_id))) if entry is not None else None
        if used is not None and int(used) == int(meta["pending"]):
            meta["committed"], slots["committed"] = meta["pending"], slots["pending"]
        if used is not None or int(meta["pending"]) < local.server_round:
            meta["pending"], slots["pending"] = -1, {}
            _store(local, meta, slots)
    return slots["committed"] or None


def save_personal(local: ClientLocal, arrays: dict[str, np.ndarray]) -> None:
    """Keep this round's personal layers pending until the server says it used the reply."""
    meta, slots = _load(local)
    meta["pending"], slots["pending"] = local.server_round, arrays
    _store(local, meta, slots)


class FedPer(AcceptedMap, FedAvg):
    """FedPer's server: FedAvg over the base arrays (the only ones it ever holds), and
    the accepted map that tells each client whether its last reply was used."""

    def __init__(self, *, personal_layers: int | str,
                 member_of: Callable[[int], int | None] | None = None, **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)
        self.personal_layers = personal_layers
        self.init_accepted(ACCEPTED_RECORD, member_of)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        return messages if self.attach_later else self.attach_accepted(messages)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        return messages if self.attach_later else self.attach_accepted(messages)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error()]
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.mark_accepted(server_round, replies)
        return arrays, metrics

    def summary(self) -> None:
        from logging import INFO

        from flwr.supercore import log

        log(INFO, "\t├──> FedPer: personal layers %r stay on the clients; the base is "
                  "averaged as FedAvg averages", self.personal_layers)
        super().summary()


def _client_half(inputs: ClientInputs) -> ClientHalf:
    """Train as FedAvg does; afterwards keep the round's personal layers pending."""

    def finish(model: nn.Module, steps: int) -> dict[str, np.ndarray]:
        if inputs.local is not None:
            save_personal(inputs.local, inputs.payload.personal(model))
        return {}

    return ClientHalf(finish=finish)


def _payload(cfg) -> PersonalLayers:
    return PersonalLayers(cfg.personal_layers)


SPEC = StrategySpec(
    name="fedper",
    reference="Arivazhagan et al., Federated Learning with Personalization Layers, "
              "arXiv 1912.00818, 2019",
    build=lambda b: FedPer(**fedavg_kwargs(b.cfg), personal_layers=b.cfg.personal_layers,
                           member_of=b.partition_of),
    traits=Traits(linear=True, secagg=True, user_dp=True, personalized=True,
                  per_client_records=True),
    client_half=_client_half,
    payload=_payload,
)

