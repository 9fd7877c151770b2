"""Checkpoints and resume (fl_app/checkpoint.py, strategies/state.py) and the client state
that outlives a round on disk (SCAFFOLD's c_i). The end-to-end kill-and-resume check is
in tests/test_e2e.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp.strategy import FedAvgM

from fl_app import checkpoint as ckpt
import strategies
from strategies.fedadam import FedAdam
from strategies.guard import Guarded
from strategies.scaffold import (
    ACCEPTED_RECORD,
    C_RECORD,
    DC_PREFIX,
    STATE_CI,
    Scaffold,
    ScaffoldClient,
    scaffold_file,
)
from strategies.state import capture, restore
from tests.test_scaffold import Point


# ------------------------------------------------------------------ strategy state
def _strategies():
    return {
        "fedadam": Guarded(FedAdam(eta=0.1, min_train_nodes=1, min_available_nodes=1)),
        "scaffold": strategies.guarded("scaffold", Scaffold(
            num_clients=3, total_examples=30, min_train_nodes=1, min_available_nodes=1,
            member_of={7: 0}.get)),
        "fedavgm": Guarded(FedAvgM(server_momentum=0.9, min_train_nodes=1, min_available_nodes=1)),
    }


def test_a_captured_strategy_state_survives_the_checkpoint_encoding_into_a_freshly_built_strategy():
    """What each strategy carries between rounds (FedAdam's m and v, SCAFFOLD's c and
    accepted map, Flower's FedAvgM momentum) is captured, encoded as the checkpoint
    stores it (typed JSON and arrays, no pickle), and restored into a strategy built
    from scratch; configuration (callables such as SCAFFOLD's member_of) stays as built."""
    rng = np.random.default_rng(0)
    w = lambda: {"w": rng.normal(size=(3, 2))}  # noqa: E731
    before = _strategies()
    before["fedadam"].inner.m, before["fedadam"].inner.v = w(), w()
    before["scaffold"].inner.c, before["scaffold"].inner.accepted = w(), {0: 3, 2: 1}
    before["fedavgm"].inner.momentum_vector = [rng.normal(size=4)]
    before["fedavgm"].inner.current_arrays = ArrayRecord({"w": Array(rng.normal(size=4))})
    for name, strategy in before.items():
        arrays: dict[str, np.ndarray] = {}
        state = ckpt.decode(json.loads(json.dumps(ckpt.encode(capture(strategy), arrays))), arrays)
        fresh = _strategies()[name]
        restore(fresh, state)
        inner, original = fresh.inner, strategy.inner
        if name == "fedadam":
            for key in ("m", "v"):
                np.testing.assert_array_equal(getattr(inner, key)["w"], getattr(original, key)["w"])
        elif name == "scaffold":
            np.testing.assert_array_equal(inner.c["w"], original.c["w"])
            assert inner.accepted == {0: 3, 2: 1}
            assert inner.member_of(7) == 0  # the built one, not a stored copy
        else:
            np.testing.assert_array_equal(inner.momentum_vector[0], original.momentum_vector[0])
            np.testing.assert_array_equal(inner.current_arrays["w"].numpy(),
                                          original.current_arrays["w"].numpy())
        # a deep copy: changing the original afterwards does not reach the restored one
        if name == "scaffold":
            original.c["w"][0, 0] = 99.0
            assert inner.c["w"][0, 0] != 99.0


# ------------------------------------------------------------------ the file
def _checkpoint(round_: int, size: int = 10) -> ckpt.Checkpoint:
    return ckpt.Checkpoint(round=round_, arrays={"w": np.full(size, float(round_), np.float32)},
                           strategy={}, history=[{"round": r} for r in range(round_ + 1)],
                           rng=ckpt.rng_state(), config={"num-server-rounds": 5, "lr": 0.1})


def test_save_load_round_trip_and_rng_restore(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    saved = _checkpoint(2)
    ckpt.save(tmp_path, saved)
    expected = (torch.rand(3), np.random.rand(3))
    loaded = ckpt.load(tmp_path)
    assert loaded.round == 2 and loaded.history == saved.history
    np.testing.assert_array_equal(loaded.arrays["w"], saved.arrays["w"])
    ckpt.restore_rng(loaded.rng)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert not list(tmp_path.glob("*.tmp"))


WRITER = """
import sys, numpy as np
from pathlib import Path
from fl_app import checkpoint as ckpt
folder = Path(sys.argv[1])
for r in range(1, 10_000):
    ckpt.save(folder, ckpt.Checkpoint(round=r, arrays={"w": np.full(20_000_000, float(r), np.float32)},
              strategy={}, history=[], rng=ckpt.rng_state(), config={}))
"""


def test_a_checkpoint_killed_during_its_write_never_replaces_the_previous_one(tmp_path):
    """A process writing 80 MB checkpoints in a loop is killed (SIGKILL) while the
    temporary file of a later checkpoint's npz is being written: the checkpoint on disk
    (the manifest and the npz it names) is a complete earlier one."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the first one complete, a second one under way
            if (tmp_path / ckpt.CHECKPOINT).exists() and list(tmp_path.glob("*.npz*.tmp")):
                break
            time.sleep(0.01)
        else:
            pytest.fail("the writer never got to its second checkpoint")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    loaded = ckpt.load(tmp_path)
    assert loaded.round >= 1
    assert loaded.arrays["w"].shape == (20_000_000,)
    assert np.all(loaded.arrays["w"] == loaded.round)


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    ckpt.save(tmp_path, _checkpoint(1))

    def crash(handle, arrays):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write_arrays", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(tmp_path, _checkpoint(2))
    monkeypatch.undo()
    assert ckpt.load(tmp_path).round == 1 and not list(tmp_path.glob("*.tmp"))
    assert len(list(tmp_path.glob("*.npz"))) == 1


def test_bad_resume_from_values_are_named(tmp_path):
    with pytest.raises(ValueError, match="'resume-from' = .* is not a folder"):
        ckpt.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no checkpoint.json"):
        ckpt.load(tmp_path)
    (tmp_path / ckpt.CHECKPOINT).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read .*checkpoint.json"):
        ckpt.load(tmp_path)


def test_a_resumed_run_must_be_the_same_run(tmp_path):
    saved = _checkpoint(3)
    ckpt.check_resumable(saved, {"num-server-rounds": 8, "lr": 0.1, "resume-from": "x"}, tmp_path)
    with pytest.raises(ValueError, match=r"differs from the checkpoint's in lr: 0.1 -> 0.2"):
        ckpt.check_resumable(saved, {"num-server-rounds": 5, "lr": 0.2}, tmp_path)
    with pytest.raises(ValueError, match="'num-server-rounds' = 2 is below the 3 rounds"):
        ckpt.check_resumable(saved, {"num-server-rounds": 2, "lr": 0.1}, tmp_path)


def test_resume_from_is_refused_with_a_sweep_or_without_checkpoints(make_config, tmp_path):
    sweep = tmp_path / "sweep.json"
    sweep.write_text("[]")
    with pytest.raises(ValueError, match="'resume-from' resumes one run; with 'sweep-file'"):
        make_config(**{"resume-from": "x", "sweep-file": str(sweep)})
    with pytest.raises(ValueError, match="'resume-from' needs 'checkpoint' = true"):
        make_config(**{"resume-from": "x", "checkpoint": False})
    with pytest.raises(ValueError, match="'fail-after-round' must be an integer >= 0"):
        make_config(**{"fail-after-round": -1})


# ------------------------------------------------------------------ SCAFFOLD's c_i on disk
def _round(state, folder, server_round, accepted, x=np.array([1.0, -1.0]), c=np.zeros(2)):
    """One client round on f(w) = ||w - 2||^2 / 2 (K = 3, lr 0.1): (Delta c_i, the client)."""
    model = Point(x)
    content = RecordDict({"arrays": ArrayRecord({"w": Array(x)}),
                          C_RECORD: ArrayRecord({"w": Array(c)}),
                          ACCEPTED_RECORD: ConfigRecord(accepted),
                          "config": ConfigRecord({"run-tag": "run", "server-round": server_round})})
    client = ScaffoldClient(model, content, state, "run", 0.1, member_id=4,
                            server_round=server_round, state_dir=str(folder))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (0.5 * (model.w - 2.0).pow(2).sum()).backward()
        client.hooks.after_backward(model)
        opt.step()
    return client.finish(model, 3)[DC_PREFIX + "w"], client


def test_a_restarted_client_commits_its_pending_c_i_from_disk_exactly_as_without_restart(tmp_path):
    """Round 1 leaves c_i+ pending; the node restarts (empty Context.state). Round 3 says
    round 1 was aggregated: the restarted client commits the same c_i+ as one that never
    restarted. A round whose contribution the server never saw (a crash before the
    checkpoint) is dropped again on the re-run."""
    kept, restarted = RecordDict(), RecordDict()
    _round(kept, tmp_path / "a", 1, {})
    _round(restarted, tmp_path / "b", 1, {})
    restarted = RecordDict()  # the restart: Context.state is gone, the folder is not
    _, a = _round(kept, tmp_path / "a", 3, {"4": 1})
    _, b = _round(restarted, tmp_path / "b", 3, {"4": 1})
    assert a.committed and b.committed
    np.testing.assert_array_equal(a.c_i["w"], b.c_i["w"])
    assert np.abs(b.c_i["w"]).sum() > 0
    # Round 4 ran (c_i+ pending for round 4), then the server crashed before its
    # checkpoint; the resumed server re-runs round 4 with the map of round 3.
    _, first = _round(restarted, tmp_path / "b", 4, {"4": 3})
    _, again = _round(RecordDict(), tmp_path / "b", 4, {"4": 3})
    assert first.committed and not again.committed  # round 4's first c_i+ never counted
    np.testing.assert_array_equal(again.c_i["w"], first.c_i["w"])  # round 3's c_i+ stands
    assert not np.array_equal(first.c_i["w"], b.c_i["w"])
    _, later = _round(RecordDict(), tmp_path / "b", 5, {"4": 4})
    assert later.committed  # the re-run's c_i+ is what round 5 commits
    assert STATE_CI not in restarted  # with a state folder, c_i lives on disk only


def test_a_damaged_client_state_file_is_an_error_not_a_silent_reset(tmp_path):
    _round(RecordDict(), tmp_path, 1, {})
    scaffold_file(tmp_path, "run", 4).write_bytes(b"not an npz file")
    with pytest.raises(ValueError, match="Cannot read this client's SCAFFOLD state"):
        _round(RecordDict(), tmp_path, 2, {"4": 1})
