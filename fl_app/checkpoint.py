"""Checkpoints of a run, and resuming from the last complete one.

After every round (and once before the first) the ServerApp writes a checkpoint into the
run folder: the round number, the global model, the strategy's state
(``strategies/state.py``: FedAdam's moments, SCAFFOLD's c and accepted map, ...), the
state of the global random generators (Python, NumPy, PyTorch), the history so far and
the run config.

The format holds data only, never code (no pickle anywhere):

- ``checkpoint-<round>-<random>.npz``: every array (the model, the strategy's NumPy
  arrays and scalars, the bytes of its Flower ``Array`` values, PyTorch's generator
  state), written with ``allow_pickle=False`` and loaded with ``np.load(...,
  allow_pickle=False)``: an object array is refused both ways;
- ``checkpoint.json`` (``CHECKPOINT``), the manifest: everything else in a typed JSON
  encoding (``encode``/``decode``): each value is ``[tag, payload]`` with an explicit
  type tag (``none``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, ``list``,
  ``tuple``, ``dict`` (keys typed too, so SCAFFOLD's int-keyed map comes back with int
  keys), ``numpy.ndarray``, ``numpy.generic``, ``torch.Tensor``, ``flwr.ArrayRecord``,
  ``flwr.ConfigRecord``, ``flwr.MetricRecord``; the last six name their arrays in the
  npz). A value decodes to exactly the type and value that was encoded; a type outside
  this list is refused when saving (a TypeError naming where it sits), an unknown tag
  when loading. The manifest also names the npz file and records its SHA-256.

A save writes the npz under a name of its own (temporary file, fsync, rename, fsync the
folder: ``fl_app/atomic.py``), then the manifest the same way, last, then removes the
npz files no manifest names any more. A process killed at any moment leaves the previous
manifest and its npz, or the new ones: never a manifest naming a missing or different
npz. A load checks the npz's SHA-256 against the manifest's before reading it: an npz
changed, damaged or swapped after the save is refused.

Loading a checkpoint runs no code from it, so a folder someone else could write can at
worst be refused or resume wrong numbers, not take over the ServerApp. The old pickle
format (``checkpoint.pkl``) is refused, never unpickled.

Run-config ``resume-from = "<run folder>"`` continues that run from its checkpoint:
the same folder, the same run name (so clients find their state), the remaining rounds
up to ``num-server-rounds`` (the total). The folder must lie under ``results-dir``
(``check_location``, symbolic links resolved). Every other key must equal the
checkpoint's: a resumed run is the same experiment, not a new one.

Client state that outlives a round (SCAFFOLD's c_i, the DP accountant) is kept by the
clients, on disk in their state folder (see ``fl_app/client_app.py: state_dir``), not
here. A round interrupted after some clients trained is trained again on resume:
SCAFFOLD's commit protocol drops the interrupted round's pending c_i+ (the server's
accepted map never saw it), and the DP accountant keeps that round's spend (its noise
was drawn), so a resumed DP run can only over-count epsilon, never under-count it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import re
import secrets
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from fl_common.atomic import write_atomic

CHECKPOINT = "checkpoint.json"  # the manifest; it names the npz that holds the arrays
LEGACY_CHECKPOINT = "checkpoint.pkl"  # the old pickle format: refused, never loaded
FORMAT = 2
_ARRAYS_FILE = re.compile(r"checkpoint-\d+-[0-9a-f]+\.npz")
# Keys a resumed run may change: where and how long it runs, not what it computes.
RESUMABLE_CHANGES = ("num-server-rounds", "resume-from", "results-dir", "run-name", "sweep-file",
                     "fail-after-round")


@dataclass
class Checkpoint:
    round: int  # the last complete round (0: before the first)
    arrays: dict[str, np.ndarray]  # the global model after that round
    strategy: dict[str, Any]  # strategies.state.capture of the strategy
    history: list[dict[str, Any]]  # summary.json's history up to that round
    rng: dict[str, Any]  # global random generators' states
    config: dict[str, Any]  # the resolved run config
    resumed_at: list[int] = field(default_factory=list)  # rounds this run was resumed after
    format: int = FORMAT


# Checkpoint's fields in the manifest, with the type each must decode to.
_FIELDS = {"round": int, "arrays": dict, "strategy": dict, "history": list, "rng": dict,
           "config": dict, "resumed_at": list}
assert set(_FIELDS) | {"format"} == {f.name for f in fields(Checkpoint)}


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.random.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])


# ------------------------------------------------------------------ the typed encoding
def encode(value: Any, arrays: dict[str, np.ndarray], where: str = "value") -> list:
    """``value`` as JSON data ``[tag, payload]``; its arrays go into ``arrays`` (the
    npz's contents, named ``a0``, ``a1``, ...) and the payload names them. Exact types
    only (a subclass such as a namedtuple is refused, as it would not come back as
    itself); TypeError naming ``where`` the value sits for anything else."""
    kind = type(value)
    if value is None:
        return ["none", None]
    if kind in (bool, int, str):
        return [kind.__name__, value]
    if kind is float:
        return ["float", value if math.isfinite(value) else repr(value)]  # nan, inf, -inf
    if kind is bytes:
        return ["bytes", base64.b64encode(value).decode("ascii")]
    if kind in (list, tuple):
        return [kind.__name__, [encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]]
    if kind is dict:
        return ["dict", [[encode(k, arrays, f"{where} (a key)"),
                          encode(v, arrays, f"{where}[{k!r}]")] for k, v in value.items()]]
    if kind is np.ndarray:
        return ["numpy.ndarray", _add(arrays, value, where)]
    if isinstance(value, np.generic):
        scalar = np.asarray(value)
        if type(scalar[()]) is not kind:
            raise TypeError(f"{where}: a {kind.__qualname__} cannot be stored in a checkpoint")
        return ["numpy.generic", _add(arrays, scalar, where)]
    if kind is torch.Tensor:
        if value.device.type != "cpu" or value.requires_grad or value.layout != torch.strided:
            raise TypeError(f"{where}: only CPU tensors without gradient can be stored in a "
                            f"checkpoint; got one on {value.device} (requires_grad "
                            f"{value.requires_grad}, {value.layout})")
        try:
            array = value.numpy()
        except TypeError as err:  # bfloat16 and other dtypes NumPy lacks
            raise TypeError(f"{where}: a tensor of {value.dtype} cannot be stored in a "
                            f"checkpoint ({err})") from None
        return ["torch.Tensor", _add(arrays, array, where)]
    if kind is ArrayRecord:
        return ["flwr.ArrayRecord", [
            [key, a.dtype, list(a.shape), a.stype,
             _add(arrays, np.frombuffer(a.data, dtype=np.uint8), f"{where}[{key!r}]")]
            for key, a in value.items()]]
    if kind in (ConfigRecord, MetricRecord):
        return [f"flwr.{kind.__name__}",
                [[key, encode(v, arrays, f"{where}[{key!r}]")] for key, v in value.items()]]
    raise TypeError(f"{where}: a {kind.__module__}.{kind.__qualname__} cannot be stored in a "
                    f"checkpoint (it holds data only: {', '.join(sorted(_DECODERS))})")


def _add(arrays: dict[str, np.ndarray], array: np.ndarray, where: str) -> str:
    if array.dtype.hasobject:
        raise TypeError(f"{where}: an array of Python objects ({array.dtype}) cannot be stored "
                        "in a checkpoint without pickle")
    key = f"a{len(arrays)}"
    arrays[key] = array
    return key


class _Bad(ValueError):
    """A manifest value that does not decode."""


def decode(data: Any, arrays: Mapping[str, np.ndarray], where: str = "value") -> Any:
    """The value ``encode`` turned into ``data``, from the npz's ``arrays``; ValueError
    naming ``where`` for a malformed value or an unknown type tag."""
    if not (type(data) is list and len(data) == 2 and type(data[0]) is str):
        raise _Bad(f"{where}: not a typed value [tag, payload]: {_short(data)}")
    tag, payload = data
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise _Bad(f"{where}: unknown type tag {tag!r}; known: {sorted(_DECODERS)}")
    return decoder(payload, arrays, where)


def _short(data: Any) -> str:
    text = json.dumps(data)
    return text if len(text) <= 80 else text[:77] + "..."


def _expect(ok: bool, tag: str, payload: Any, where: str) -> None:
    if not ok:
        raise _Bad(f"{where}: {_short(payload)} is not a {tag} payload")


def _scalar(kind: type) -> Any:
    def decoder(payload: Any, arrays: Mapping[str, np.ndarray], where: str) -> Any:
        _expect(type(payload) is kind, kind.__name__, payload, where)
        return payload
    return decoder


def _none(payload: Any, arrays: Mapping[str, np.ndarray], where: str) -> None:
    _expect(payload is None, "none", payload, where)


def _float(payload: Any, arrays: Mapping[str, np.ndarray], where: str) -> float:
    _expect(type(payload) in (int, float) or payload in ("nan", "inf", "-inf"), "float",
            payload, where)
    return float(payload)


def _bytes(payload: Any, arrays: Mapping[str, np.ndarray], where: str) -> bytes:
    _expect(type(payload) is str, "bytes", payload, where)
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise _Bad(f"{where}: {_short(payload)} is not base64") from None


def _sequence(kind: type) -> Any:
    def decoder(payload: Any, arrays: Mapping[str, np.ndarray], where: str) -> Any:
        _expect(type(payload) is list, kind.__name__, payload, where)
        return kind(decode(v, arrays, f"{where}[{i}]") for i, v in enumerate(payload))
    return decoder


def _pairs(payload: Any, tag: str, where: str) -> list:
    _expect(type(payload) is list and all(type(p) is list and len(p) == 2 for p in payload),
            tag, payload, where)
    return payload


def _dict(payload: Any, arrays: Mapping[str, np.ndarray], where: str) -> dict:
    out = {}
    for k, v in _pairs(payload, "dict", where):
        key = decode(k, arrays, f"{where} (a key)")
        value = decode(v, arrays, f"{where}[{key!r}]")
        try:
            out[key] = value
        except TypeError:  # an unhashable key
            raise _Bad(f"{where}: a {type(key).__name__} cannot be a dict key") from None
    return out


def _array(key: Any, arrays: Mapping[str, np.ndarray], where: str) -> np.ndarray:
    if type(key) is not str or key not in arrays:
        raise _Bad(f"{where}: names array {_short(key)}, which the npz does not hold")
    return arrays[key]


def _ndarray(payload: Any, arrays: Mapping[str, np.ndarray], where: str) -> np.ndarray:
    return _array(payload, arrays, where)


def _generic(payload: Any, arrays: Mapping[str, np.ndarray], where: str) -> np.generic:
    array = _array(payload, arrays, where)
    if array.shape != ():
        raise _Bad(f"{where}: a numpy.generic must be a 0-d array, got shape {array.shape}")
    return array[()]


def _tensor(payload: Any, arrays: Mapping[str, np.ndarray], where: str) -> torch.Tensor:
    array = _array(payload, arrays, where)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _array_record(payload: Any, arrays: Mapping[str, np.ndarray], where: str) -> ArrayRecord:
    _expect(type(payload) is list, "flwr.ArrayRecord", payload, where)
    record = {}
    for entry in payload:
        _expect(type(entry) is list and len(entry) == 5 and type(entry[0]) is str
                and type(entry[1]) is str and type(entry[2]) is list
                and all(type(n) is int for n in entry[2]) and type(entry[3]) is str,
                "flwr.ArrayRecord", entry, where)
        key, dtype, shape, stype, data = entry
        raw = _array(data, arrays, f"{where}[{key!r}]")
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise _Bad(f"{where}[{key!r}]: an Array's data must be a 1-d uint8 array")
        record[key] = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=raw.tobytes())
    return ArrayRecord(record)


def _record(kind: type) -> Any:
    def decoder(payload: Any, arrays: Mapping[str, np.ndarray], where: str) -> Any:
        items = {}
        for key, v in _pairs(payload, f"flwr.{kind.__name__}", where):
            _expect(type(key) is str, f"flwr.{kind.__name__}", key, where)
            items[key] = decode(v, arrays, f"{where}[{key!r}]")
        try:
            return kind(items)
        except (TypeError, ValueError) as err:
            raise _Bad(f"{where}: not a {kind.__name__} ({err})") from None
    return decoder


_DECODERS = {
    "none": _none, "bool": _scalar(bool), "int": _scalar(int), "float": _float,
    "str": _scalar(str), "bytes": _bytes, "list": _sequence(list), "tuple": _sequence(tuple),
    "dict": _dict, "numpy.ndarray": _ndarray, "numpy.generic": _generic,
    "torch.Tensor": _tensor, "flwr.ArrayRecord": _array_record,
    "flwr.ConfigRecord": _record(ConfigRecord), "flwr.MetricRecord": _record(MetricRecord),
}


# ------------------------------------------------------------------ the files
class _Hashing:
    """A write-only, unseekable file that hashes what passes through it (so zipfile
    writes the archive front to back and the hash is that of the file)."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.sha256 = handle, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def _write_arrays(handle: BinaryIO, arrays: dict[str, np.ndarray]) -> str:
    """``arrays`` as an npz (uncompressed, no pickle) into ``handle``; its SHA-256."""
    out = _Hashing(handle)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, array in arrays.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return out.sha256.hexdigest()


def save(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically: its npz under a new name, then the manifest that
    names it (each: temporary file, fsync, rename, fsync the folder), then remove the
    npz files it replaced. Returns the manifest's path. TypeError (and the previous
    checkpoint kept) for a value the format cannot hold."""
    run_dir = Path(run_dir)
    values = {name: getattr(checkpoint, name) for name in _FIELDS}
    problem = _field_problem(values)  # what load refuses: every save must load
    if problem:
        raise TypeError(f"Checkpoint.{problem}")
    arrays: dict[str, np.ndarray] = {}
    encoded = {name: encode(value, arrays, name) for name, value in values.items()}
    npz_name = f"checkpoint-{checkpoint.round:06d}-{secrets.token_hex(8)}.npz"
    digest: dict[str, str] = {}
    write_atomic(run_dir / npz_name,
                 lambda handle: digest.__setitem__("sha256", _write_arrays(handle, arrays)))
    manifest = {"format": FORMAT, "arrays_file": npz_name, "arrays_sha256": digest["sha256"],
                "checkpoint": encoded}
    text = json.dumps(manifest, allow_nan=False, separators=(",", ":")).encode()
    path = run_dir / CHECKPOINT
    try:
        write_atomic(path, lambda handle: handle.write(text))
    except BaseException:
        (run_dir / npz_name).unlink(missing_ok=True)  # no manifest names it
        raise
    for stale in run_dir.glob("checkpoint-*.npz"):
        if stale.name != npz_name and _ARRAYS_FILE.fullmatch(stale.name):
            stale.unlink(missing_ok=True)
    return path


def _field_problem(values: dict[str, Any]) -> str | None:
    """What is wrong with these Checkpoint field values, or None."""
    for name, kind in _FIELDS.items():
        if type(values[name]) is not kind:
            return f"{name} is a {type(values[name]).__name__}, not a {kind.__name__}"
    if not all(type(k) is str and type(v) is np.ndarray for k, v in values["arrays"].items()):
        return "arrays must map names (str) to NumPy arrays"
    return None


def load(run_dir: Path) -> Checkpoint:
    """The checkpoint of the run in ``run_dir``; ValueError naming the problem. Runs
    no code from the folder: JSON, and arrays with ``allow_pickle=False``."""
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT
    if not run_dir.is_dir():
        raise ValueError(f"Run config 'resume-from' = {str(run_dir)!r} is not a folder; "
                         f"accepted: the folder of an earlier run (it holds {CHECKPOINT})")
    if not path.is_file():
        legacy = run_dir / LEGACY_CHECKPOINT
        if legacy.exists():
            raise ValueError(f"Run config 'resume-from': {legacy} is a checkpoint of the old "
                             "pickle format, which this version does not load (unpickling a "
                             "file can run any code in it); accepted: a run folder with "
                             f"{CHECKPOINT}, written by this version: start the run again")
        raise ValueError(f"Run config 'resume-from': {run_dir} holds no {CHECKPOINT}; only runs "
                         "that checkpointed (checkpoint = true) can be resumed")
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        raise ValueError(f"Run config 'resume-from': cannot read {path} ({type(err).__name__}: "
                         f"{err})") from None
    if type(manifest) is not dict or manifest.get("format") != FORMAT:
        found = manifest.get("format") if type(manifest) is dict else None
        raise ValueError(f"Run config 'resume-from': {path} is not a checkpoint of this app's "
                         f"format {FORMAT} (format: {found!r})")
    name, recorded = manifest.get("arrays_file"), manifest.get("arrays_sha256")
    if type(name) is not str or not _ARRAYS_FILE.fullmatch(name) or type(recorded) is not str:
        raise ValueError(f"Run config 'resume-from': cannot read {path} (it names no arrays "
                         f"file of the form checkpoint-<round>-<hex>.npz in this folder, with "
                         f"its SHA-256: {_short(name)}, {_short(recorded)})")
    npz = run_dir / name
    try:
        handle = open(npz, "rb")
    except OSError as err:
        raise ValueError(f"Run config 'resume-from': {path} names {name}, which cannot be read "
                         f"({type(err).__name__}: {err}); the checkpoint is incomplete") from None
    with handle:
        found = hashlib.file_digest(handle, "sha256").hexdigest()
        if found != recorded:
            raise ValueError(f"Run config 'resume-from': {npz} does not match the SHA-256 "
                             f"{path} records for it (found {found}, recorded {recorded}); it "
                             "was changed or damaged after the checkpoint was written, and is "
                             "not loaded")
        handle.seek(0)
        try:
            values = _read(manifest, handle)
        except Exception as err:  # noqa: BLE001 - any failure here means a bad checkpoint
            kind = "ValueError" if isinstance(err, _Bad) else type(err).__name__
            raise ValueError(f"Run config 'resume-from': cannot read {path} ({kind}: {err})"
                             ) from None
    return Checkpoint(**values, format=FORMAT)


def _read(manifest: dict, handle: BinaryIO) -> dict[str, Any]:
    """The Checkpoint fields of ``manifest``, its arrays read from ``handle``."""
    archive = np.load(handle, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise _Bad("the arrays file is not an npz archive")
    with archive:
        arrays = {key: archive[key] for key in archive.files}
    encoded = manifest.get("checkpoint")
    if type(encoded) is not dict or set(encoded) != set(_FIELDS):
        raise _Bad(f"its 'checkpoint' must hold exactly {sorted(_FIELDS)}")
    values = {name: decode(encoded[name], arrays, name) for name in _FIELDS}
    problem = _field_problem(values)
    if problem:
        raise _Bad(problem)
    return values


def check_location(path: Path, results_dir: Path) -> Path:
    """``path`` (``resume-from``) resolved, symbolic links and ``..`` included; ValueError
    unless it lies under ``results_dir`` (``results-dir``, resolved the same way)."""
    folder, root = Path(path).resolve(), Path(results_dir).resolve()
    if folder == root or not folder.is_relative_to(root):
        raise ValueError(f"Run config 'resume-from' = {str(path)!r} is not inside 'results-dir' "
                         f"= {str(results_dir)!r} (resolved: {folder} is not under {root}); "
                         "accepted: a run folder under results-dir (symbolic links resolved)")
    return folder


def check_resumable(checkpoint: Checkpoint, config: dict[str, Any], path: Path) -> None:
    """The run config must be the checkpoint's, up to ``RESUMABLE_CHANGES``, and leave
    rounds to do; raises ValueError naming every differing key."""
    differ = sorted(k for k in set(config) | set(checkpoint.config)
                    if k not in RESUMABLE_CHANGES and config.get(k) != checkpoint.config.get(k))
    if differ:
        detail = ", ".join(f"{k}: {checkpoint.config.get(k)!r} -> {config.get(k)!r}" for k in differ)
        raise ValueError(f"Run config 'resume-from' = {str(path)!r}: the run config differs from "
                         f"the checkpoint's in {detail}; a resumed run must be the same run "
                         f"(only {list(RESUMABLE_CHANGES)} may change)")
    total = int(config["num-server-rounds"])
    if total < checkpoint.round:
        raise ValueError(f"Run config 'num-server-rounds' = {total} is below the {checkpoint.round} "
                         f"rounds the checkpoint in {path} has done; it is the run's total")
