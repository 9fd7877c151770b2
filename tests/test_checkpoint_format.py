"""The checkpoint format (fl_app/checkpoint.py): data only, no pickle. Typed JSON plus an
npz loaded with allow_pickle=False round-trip every kind of value exactly; the two files
cannot disagree after a crash or a change (SHA-256); the old pickle format is refused
without being unpickled; resume-from must lie under results-dir."""

from __future__ import annotations

import ast
import hashlib
import json
import math
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

import strategies
from fl_app import checkpoint as ckpt
from strategies.scaffold import DC_PREFIX
from strategies.state import capture, restore
from tests.helpers import make_grid, make_reply

ROOT = Path(__file__).resolve().parents[1]


def same(a, b, where="value"):
    """``a`` and ``b`` have the same types and values, all the way down (bit for bit for
    arrays and floats, in the same order for dicts and records)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, np.ndarray) or isinstance(a, np.generic):
        a, b = np.asarray(a), np.asarray(b)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), \
            f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), f"{where}: values differ"
    elif isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), where
        assert torch.equal(a, b), f"{where}: values differ"
    elif isinstance(a, float):
        assert repr(a) == repr(b), f"{where}: {a!r} != {b!r}"  # nan, -0.0 included
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, (dict, ConfigRecord, MetricRecord, ArrayRecord)):
        assert list(a.keys()) == list(b.keys()), f"{where}: keys {list(a)} != {list(b)}"
        for (k, x), (j, y) in zip(a.items(), b.items()):
            same(k, j, f"{where} (key {k!r})")
            same(x, y, f"{where}[{k!r}]")
    elif isinstance(a, Array):
        assert (a.dtype, a.shape, a.stype, a.data) == (b.dtype, b.shape, b.stype, b.data), where
        assert type(b.shape) is tuple and all(type(n) is int for n in b.shape), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _json_round_trip(value):
    arrays: dict[str, np.ndarray] = {}
    data = json.loads(json.dumps(ckpt.encode(value, arrays), allow_nan=False))
    return ckpt.decode(data, arrays), data


def _tags(data) -> set[str]:
    """The type tags an encoded value uses."""
    tag, payload = data
    found = {tag}
    if tag in ("list", "tuple"):
        for item in payload:
            found |= _tags(item)
    elif tag == "dict":
        for key, item in payload:
            found |= _tags(key) | _tags(item)
    elif tag in ("flwr.ConfigRecord", "flwr.MetricRecord"):
        for _, item in payload:
            found |= _tags(item)
    return found


EVERY_KIND = {
    "none": None, "bools": [True, False], "ints": (0, -7, 2**80),
    "floats": [0.1, -0.0, 1e300, float("inf"), float("-inf"), float("nan")],
    "str": "ünïcode", "bytes": b"\x00\xffraw",
    "nested": [(1, [2, (3,)]), {"k": ()}, [], {}],
    3: "an int key", (1, "a"): "a tuple key", None: "a None key", 2.5: "a float key",
    "numpy scalars": [np.float16(1.5), np.float32(0.1), np.float64(-0.0), np.longdouble(1) / 3,
                      np.int8(-3), np.uint64(2**63), np.bool_(True), np.complex128(1 - 2j),
                      np.str_("s"), np.bytes_(b"b"), np.datetime64("2024-01-02T03:04"),
                      np.timedelta64(5, "s")],
    "arrays": [np.arange(6, dtype=np.float32).reshape(2, 3), np.asfortranarray(np.eye(3)),
               np.array([], dtype=np.int16), np.array(["ab", "c"]), np.array(7, dtype=np.uint8),
               np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")])],
    "tensor": torch.tensor([1, 2, 255], dtype=torch.uint8),
    "records": [ArrayRecord({"w": Array(np.arange(4.0).reshape(2, 2)),
                             "b": Array(torch.ones(3, dtype=torch.float16))}), ArrayRecord(),
                ConfigRecord({"s": "x", "i": 1, "f": 0.5, "b": True, "raw": b"\x01",
                              "li": [1, 2], "ls": ["a"]}),
                MetricRecord({"acc": 0.75, "n": 12, "lf": [0.5, 1.5]}), MetricRecord()],
}


def test_every_kind_of_value_comes_back_with_its_exact_type_and_value():
    decoded, data = _json_round_trip(EVERY_KIND)
    same(decoded, EVERY_KIND)
    assert _tags(data) == set(ckpt._DECODERS)  # every tag the format has is exercised here
    assert 3 in decoded and "3" not in decoded and (1, "a") in decoded  # keys keep their types


def test_the_same_value_through_save_and_load(tmp_path):
    saved = _checkpoint(4, strategy={"weird": ("value", EVERY_KIND)})
    ckpt.save(tmp_path, saved)
    loaded = ckpt.load(tmp_path)
    for name in ("round", "arrays", "strategy", "history", "rng", "config", "resumed_at", "format"):
        same(getattr(loaded, name), getattr(saved, name), name)


def test_values_the_format_cannot_hold_are_refused_when_saving_and_the_old_checkpoint_stays(tmp_path):
    from collections import OrderedDict, namedtuple

    ckpt.save(tmp_path, _checkpoint(1))
    before = sorted(p.name for p in tmp_path.iterdir())
    Pair = namedtuple("Pair", "a b")
    for bad, what in ((object(), "builtins.object"), (Pair(1, 2), "Pair"),
                      (OrderedDict(a=1), "OrderedDict"), (np.array([{}], dtype=object), "Python objects"),
                      (torch.zeros(2, requires_grad=True), "without gradient"),
                      (torch.zeros(2, dtype=torch.bfloat16), "bfloat16")):
        with pytest.raises(TypeError, match=what) as err:
            ckpt.save(tmp_path, _checkpoint(2, strategy={"inner": ("strategy", {"x": ("value", [bad])})}))
        assert "strategy" in str(err.value) and "['x']" in str(err.value)  # where it sits
    with pytest.raises(TypeError, match="Checkpoint.round is a int64, not a int"):
        ckpt.save(tmp_path, _checkpoint(np.int64(2)))  # it would not load as a round
    with pytest.raises(TypeError, match="Checkpoint.arrays must map names"):
        ckpt.save(tmp_path, ckpt.Checkpoint(round=2, arrays={"w": torch.zeros(2)}, strategy={},
                                            history=[], rng={}, config={}))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert ckpt.load(tmp_path).round == 1


def test_malformed_values_and_unknown_tags_are_refused_by_name():
    for data, message in ((["pickle", "gASVCg=="], "unknown type tag 'pickle'"),
                          ([1, 2], "not a typed value"), ({"t": "int"}, "not a typed value"),
                          (["int", "1"], "is not a int payload"), (["int", True], "not a int"),
                          (["float", "1e3"], "is not a float payload"),
                          (["numpy.ndarray", "a9"], "names array \"a9\", which the npz does not hold"),
                          (["dict", [[["list", []], ["int", 1]]]], "cannot be a dict key"),
                          (["bytes", "not base64!"], "not base64")):
        with pytest.raises(ValueError, match=message):
            ckpt.decode(data, {})


# ------------------------------------------------------------------ realistic strategy state
NODES = [11, 12, 13, 14, 15]


def _built(make_config, name):
    cfg = make_config(strategy=name, **{"min-train-nodes": 3, "fraction-train": 1.0})
    return strategies.guarded(name, strategies.build(cfg, len(NODES), 100))


def _round(strategy, name, server_round, x, seed):
    """One real round of ``strategy`` (configure_train, replies, aggregate_train)."""
    messages = list(strategy.configure_train(server_round, x, ConfigRecord(), make_grid(NODES)))
    messages.sort(key=lambda msg: msg.metadata.dst_node_id)  # Flower samples in random order
    replies = []
    for msg in messages:  # each node's reply drawn from (seed, node)
        rng = np.random.default_rng([seed, msg.metadata.dst_node_id])
        w = {k: a.numpy() + rng.normal(scale=0.1, size=a.shape).astype(a.dtype) for k, a in x.items()}
        if name == "scaffold":
            w.update({DC_PREFIX + k: rng.normal(size=a.shape).astype(a.dtype) for k, a in x.items()})
        replies.append(make_reply(w, num_examples=int(rng.integers(1, 20)),
                                  node_id=msg.metadata.dst_node_id))
    new, _ = strategy.aggregate_train(server_round, replies)
    return x if new is None else new


@pytest.mark.parametrize("name", strategies.NAMES)
def test_a_real_strategy_state_survives_the_checkpoint_exactly(make_config, tmp_path, name):
    """Every strategy of the registry, built by the app's own code and wrapped as the
    ServerApp wraps it, after two real rounds (FedAdam's m and v, SCAFFOLD's c and its
    int-keyed accepted map, FedAvgM's momentum, FedYogi's moments, Krum's selection,
    Guarded's last metrics): the loaded capture equals the saved one in types and
    values, and a fresh strategy restored from it runs round 3 exactly as the original."""
    original = _built(make_config, name)
    x = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)), "b": Array(np.ones(3, np.float32))})
    for server_round in (1, 2):
        x = _round(original, name, server_round, x, server_round)
    state = capture(original)
    ckpt.save(tmp_path, _checkpoint(2, strategy=state))
    loaded = ckpt.load(tmp_path).strategy
    same(loaded, state, "strategy")
    if name == "scaffold":
        accepted = loaded["inner"][1]["accepted"][1]
        assert accepted and all(type(k) is int for k in accepted)  # partition ids stay ints
    fresh = _built(make_config, name)
    restore(fresh, loaded)
    same(capture(fresh)["inner"], state["inner"], "restored")
    a, b = _round(original, name, 3, x, 3), _round(fresh, name, 3, x, 3)
    same(a, b, "round 3's model")
    same(capture(fresh)["inner"], capture(original)["inner"], "round 3's state")


def test_the_random_generators_continue_exactly_after_a_load(tmp_path):
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    random.random(), np.random.randn(3), torch.randn(2)  # cached Gaussian, advanced states
    saved = _checkpoint(1)
    ckpt.save(tmp_path, saved)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(4), np.random.randn(3),
                torch.rand(3), torch.randint(0, 100, (5,)))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    loaded = ckpt.load(tmp_path)
    same(loaded.rng, saved.rng, "rng")
    ckpt.restore_rng(loaded.rng)
    drawn = (random.random(), random.gauss(0, 1), np.random.rand(4), np.random.randn(3),
             torch.rand(3), torch.randint(0, 100, (5,)))
    same(drawn, expected, "draws")


# ------------------------------------------------------------------ no pickle, ever
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                  "marshal", "copyreg"}


@pytest.mark.parametrize("module", ["fl_app/checkpoint.py", "strategies/state.py"])
def test_the_checkpoint_code_imports_no_pickle_and_loads_nothing_with_it(module):
    tree = ast.parse((ROOT / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert not imported & PICKLE_MODULES, f"{module} imports {imported & PICKLE_MODULES}"
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            assert isinstance(node.value, ast.Constant) and node.value.value is False, module
        if isinstance(node, ast.Attribute) and node.attr == "load" and \
                isinstance(node.value, ast.Name) and node.value.id == "torch":
            pytest.fail(f"{module} calls torch.load (which unpickles)")


class _Plant:
    """Unpickling this creates ``marker``: what a malicious checkpoint.pkl could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_an_old_pickle_checkpoint_is_refused_by_name_and_never_unpickled(make_config, tmp_path):
    from fl_app.server_app import resume_point

    results, marker = tmp_path / "results", tmp_path / "unpickled-marker"
    run = results / "old-run"
    run.mkdir(parents=True)
    (run / "checkpoint.pkl").write_bytes(pickle.dumps(_Plant(marker)))
    with pytest.raises(ValueError) as err:
        ckpt.load(run)
    assert not marker.exists(), "the old checkpoint was unpickled"
    assert re.search(r"Run config 'resume-from': .*old-run/checkpoint.pkl is a checkpoint of the "
                     r"old pickle format, which this version does not load", str(err.value))
    cfg = make_config(**{"results-dir": str(results), "resume-from": str(run)})
    with pytest.raises(ValueError, match="old pickle format"):
        resume_point(cfg)
    assert not marker.exists()


def test_an_npz_with_pickled_objects_is_refused_even_with_a_matching_hash(tmp_path):
    """A hand-made checkpoint whose npz holds an object array (whose unpickling would
    create a file) and whose manifest records the right hash: np.load refuses it."""
    marker = tmp_path / "unpickled-marker"
    ckpt.save(tmp_path, _checkpoint(1))
    manifest = json.loads((tmp_path / ckpt.CHECKPOINT).read_text())
    evil = tmp_path / manifest["arrays_file"]
    np.savez(evil, a0=np.array([_Plant(marker)], dtype=object))  # numpy's default pickles
    manifest["arrays_sha256"] = hashlib.sha256(evil.read_bytes()).hexdigest()
    manifest["checkpoint"]["arrays"] = ["dict", [[["str", "w"], ["numpy.ndarray", "a0"]]]]
    (tmp_path / ckpt.CHECKPOINT).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="cannot read .*checkpoint.json.*allow_pickle=False"):
        ckpt.load(tmp_path)
    assert not marker.exists()


# ------------------------------------------------------------------ the two files agree
def _checkpoint(round_: int, size: int = 10, strategy=None) -> ckpt.Checkpoint:
    return ckpt.Checkpoint(round=round_, arrays={"w": np.full(size, float(round_), np.float32)},
                           strategy=strategy or {}, history=[{"round": r} for r in range(round_ + 1)],
                           rng=ckpt.rng_state(), config={"num-server-rounds": 5, "lr": 0.1})


def _npz(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.npz"))


def test_a_changed_or_swapped_npz_is_refused_by_its_hash(tmp_path):
    ckpt.save(tmp_path / "other", _checkpoint(3))
    ckpt.save(tmp_path, _checkpoint(2))
    npz = tmp_path / _npz(tmp_path)[0]
    pristine = npz.read_bytes()
    damaged = bytearray(pristine)
    damaged[len(damaged) // 2] ^= 0x01  # one bit, inside the array data
    npz.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"checkpoint-000002-\w+\.npz does not match the SHA-256 "
                                         r".*checkpoint.json records for it"):
        ckpt.load(tmp_path)
    npz.write_bytes((tmp_path / "other" / _npz(tmp_path / "other")[0]).read_bytes())  # a valid npz
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        ckpt.load(tmp_path)
    npz.write_bytes(pristine)
    assert ckpt.load(tmp_path).round == 2


def test_a_manifest_naming_a_missing_or_foreign_file_is_refused(tmp_path):
    ckpt.save(tmp_path, _checkpoint(2))
    path = tmp_path / ckpt.CHECKPOINT
    manifest = json.loads(path.read_text())
    for name in ("../other/checkpoint-000001-ab.npz", "/etc/passwd", "final_model.npz", 7):
        path.write_text(json.dumps({**manifest, "arrays_file": name}))
        with pytest.raises(ValueError, match="names no arrays file of the form"):
            ckpt.load(tmp_path)
    path.write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(ValueError, match="not a checkpoint of this app's format 2"):
        ckpt.load(tmp_path)
    path.write_text(json.dumps({**manifest, "checkpoint": {**manifest["checkpoint"],
                                                          "round": ["pickle", "x"]}}))
    with pytest.raises(ValueError, match=r"cannot read .*checkpoint.json \(ValueError: round: "
                                         r"unknown type tag 'pickle'"):
        ckpt.load(tmp_path)
    path.write_text(json.dumps({**manifest, "checkpoint": {**manifest["checkpoint"],
                                                          "round": ["str", "2"]}}))
    with pytest.raises(ValueError, match="round is a str, not a int"):
        ckpt.load(tmp_path)
    path.write_text(json.dumps(manifest))
    (tmp_path / manifest["arrays_file"]).unlink()
    with pytest.raises(ValueError, match=r"names checkpoint-000002-\w+\.npz, which cannot be read"):
        ckpt.load(tmp_path)


def test_only_the_npz_the_manifest_names_is_kept(tmp_path):
    for r in range(4):
        ckpt.save(tmp_path, _checkpoint(r))
    manifest = json.loads((tmp_path / ckpt.CHECKPOINT).read_text())
    assert _npz(tmp_path) == [manifest["arrays_file"]] and manifest["arrays_file"].startswith(
        "checkpoint-000003-")
    ckpt.save(tmp_path, _checkpoint(3))  # the same round again: a new name, the old one goes
    assert _npz(tmp_path) == [json.loads((tmp_path / ckpt.CHECKPOINT).read_text())["arrays_file"]]
    assert _npz(tmp_path) != [manifest["arrays_file"]]


def test_a_crash_between_the_npz_and_the_manifest_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save(tmp_path, _checkpoint(1))
    first = _npz(tmp_path)
    real = ckpt.write_atomic

    def manifest_fails(path, write):
        if Path(path).name == ckpt.CHECKPOINT:
            def half(handle):
                handle.write(b'{"format": 2, "arr')
                raise OSError("disk full")
            return real(path, half)
        return real(path, write)

    monkeypatch.setattr(ckpt, "write_atomic", manifest_fails)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(tmp_path, _checkpoint(2))
    monkeypatch.undo()
    assert ckpt.load(tmp_path).round == 1
    assert _npz(tmp_path) == first and not list(tmp_path.glob("*.tmp"))  # the new npz removed
    # A kill at the same moment leaves the new npz behind, which no manifest names: the
    # previous checkpoint still loads, and the next save removes the orphan.
    (tmp_path / "checkpoint-000002-0123456789abcdef.npz").write_bytes(b"orphan")
    assert ckpt.load(tmp_path).round == 1
    ckpt.save(tmp_path, _checkpoint(2))
    assert len(_npz(tmp_path)) == 1 and ckpt.load(tmp_path).round == 2


TIGHT_WRITER = """
import sys, numpy as np
from pathlib import Path
from fl_app import checkpoint as ckpt
folder, start = Path(sys.argv[1]), int(sys.argv[2])
for r in range(start, start + 100_000):
    ckpt.save(folder, ckpt.Checkpoint(round=r, arrays={"w": np.full(50_000, float(r), np.float32)},
              strategy={"s": ("value", {r: (np.float32(r), [r] * 3)})},
              history=[{"round": i} for i in range(r + 1)], rng=ckpt.rng_state(), config={}))
"""


def _round_now(folder: Path) -> int:
    """The round of the checkpoint in ``folder`` (-1: none yet, or one being replaced
    under a reader: its npz removed between reading the manifest and opening it)."""
    try:
        return ckpt.load(folder).round
    except ValueError:
        return -1


def test_a_writer_killed_at_random_moments_always_leaves_one_consistent_checkpoint(tmp_path):
    """Small checkpoints saved back to back (so a kill lands anywhere: in the npz, between
    the npz and the manifest, in the manifest, in the clean-up), SIGKILLed at random
    moments, three times over in the same folder: each time the checkpoint on disk loads,
    and its manifest and its npz are of the same round."""
    rng = random.Random(0)
    start = 1
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", TIGHT_WRITER, str(tmp_path), str(start)],
                                cwd=ROOT)
        try:
            deadline = time.monotonic() + 120
            while _round_now(tmp_path) < start:
                assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.05, 0.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            proc.kill()
        loaded = ckpt.load(tmp_path)
        assert loaded.round >= start and np.all(loaded.arrays["w"] == loaded.round)
        assert len(loaded.history) == loaded.round + 1
        same(loaded.strategy, {"s": ("value", {loaded.round: (np.float32(loaded.round),
                                                              [loaded.round] * 3)})})
        start = loaded.round + 1


# ------------------------------------------------------------------ resume-from's location
def test_resume_from_must_lie_under_results_dir(tmp_path):
    results, outside = tmp_path / "results", tmp_path / "elsewhere"
    (results / "run").mkdir(parents=True)
    (outside / "run").mkdir(parents=True)
    (results / "link").symlink_to(outside / "run")
    (results / "inner-link").symlink_to(results / "run")
    assert ckpt.check_location(results / "run", results) == (results / "run").resolve()
    assert ckpt.check_location(results / "inner-link", results) == (results / "run").resolve()
    assert ckpt.check_location(results / "run", tmp_path / "." / "results") == (results / "run").resolve()
    for path in (outside / "run", results / "link", results / ".." / "elsewhere" / "run", results,
                 Path("/")):
        with pytest.raises(ValueError, match=r"Run config 'resume-from' = .* is not inside "
                                             r"'results-dir' = .*; accepted: a run folder under "
                                             r"results-dir"):
            ckpt.check_location(path, results)


def test_resume_point_refuses_a_checkpoint_outside_results_dir(make_config, tmp_path):
    from fl_app.server_app import resume_point

    results, outside = tmp_path / "results", tmp_path / "elsewhere"
    results.mkdir()
    base = make_config(**{"results-dir": str(results)})
    ckpt.save(outside / "run", ckpt.Checkpoint(round=1, arrays={}, strategy={}, history=[],
                                               rng=ckpt.rng_state(), config=base.resolved()))
    (results / "link").symlink_to(outside / "run")
    for path in (outside / "run", results / "link"):
        cfg = make_config(**{"results-dir": str(results), "resume-from": str(path)})
        with pytest.raises(ValueError, match="'resume-from' = .* is not inside 'results-dir'"):
            resume_point(cfg)
    (results / "link").unlink()
    (outside / "run").rename(results / "run")
    cfg = make_config(**{"results-dir": str(results), "resume-from": str(results / "run")})
    checkpoint, path = resume_point(cfg)
    assert checkpoint.round == 1 and path == (results / "run").resolve()


def test_floats_that_json_cannot_spell_are_tagged_strings():
    _, data = _json_round_trip([math.nan, math.inf])
    assert data == ["list", [["float", "nan"], ["float", "inf"]]]
