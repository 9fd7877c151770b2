"""Results: nothing is overwritten, summaries are complete-or-marked, reports aggregate right."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.grids import Grid
from deploy.launch import run_config_arg, toml_value
from experiments.report import aggregate, markdown_table, rounds_to_target
from fl_app.results import RunRecorder, fresh_run_dir, is_complete, resolve_results_dir


def test_existing_run_directory_is_never_reused(tmp_path):
    first = fresh_run_dir(tmp_path, "run")
    (first / "keep.txt").write_text("user data")
    second = fresh_run_dir(tmp_path, "run")
    assert first.name == "run" and second.name == "run-2"
    assert (first / "keep.txt").read_text() == "user data"


def test_summary_is_incomplete_until_finished(tmp_path):
    run_dir = fresh_run_dir(tmp_path, "r")
    recorder = RunRecorder(run_dir, {"num-server-rounds": 1}, {"num_partitions": 2})
    recorder.add_round({"round": 0, "test_accuracy": 0.1, "test_loss": 2.3})
    assert not is_complete(run_dir)
    recorder.add_round({"round": 1, "test_accuracy": 0.7, "test_loss": 0.9})
    summary = recorder.finish({"w": torch.zeros(2)})
    assert is_complete(run_dir)
    assert summary["final_test_accuracy"] == 0.7 and summary["best_test_accuracy"] == 0.7
    assert json.loads((run_dir / "config.json").read_text()) == {"num-server-rounds": 1}
    assert torch.equal(torch.load(run_dir / "final_model.pt")["w"], torch.zeros(2))
    assert (run_dir / "accuracy.png").stat().st_size > 1000


def test_relative_results_dir_uses_workdir(monkeypatch, tmp_path):
    monkeypatch.setenv("FL_APP_WORKDIR", str(tmp_path))
    assert resolve_results_dir("res") == tmp_path / "res"
    assert resolve_results_dir("/abs/res").as_posix() == "/abs/res"


def test_run_config_overrides_are_toml():
    assert toml_value(True) == "true" and toml_value(3) == "3" and toml_value(0.5) == "0.5"
    assert toml_value('a "b"') == '"a \\"b\\""'
    assert run_config_arg({"strategy": "fedavg", "alpha": 0.1}) == 'strategy="fedavg" alpha=0.1'
    with pytest.raises(TypeError):
        toml_value([1])


def _summary(final, history_acc, seconds):
    history = [{"round": r, "test_accuracy": a, "train_seconds": seconds,
                "upload_bytes_per_client": 1024} for r, a in enumerate(history_acc)]
    return {"final_test_accuracy": final, "best_test_accuracy": max(history_acc), "history": history}


def test_report_aggregates_mean_std_rounds_to_target_and_time_ratio():
    grid = Grid("g", "d", {}, {"fedavg": {}, "x": {}}, ("iid",), (0, 1), target_accuracy=0.5)
    summaries = {
        "fedavg__iid__s0": _summary(0.6, [0.1, 0.4, 0.6], 2.0),
        "fedavg__iid__s1": _summary(0.8, [0.1, 0.5, 0.8], 2.0),
        "x__iid__s0": _summary(0.3, [0.1, 0.2, 0.3], 3.0),
    }
    rows = {r["strategy"]: r for r in aggregate(grid, summaries)}
    assert rows["fedavg"]["final_acc_mean"] == pytest.approx(0.7)
    assert rows["fedavg"]["final_acc_std"] == pytest.approx(0.1414213562)  # sample std
    assert rows["fedavg"]["rounds_to_target_mean"] == pytest.approx(1.5)  # rounds 2 and 1
    assert rows["x"]["rounds_to_target_mean"] is None and rows["x"]["reached_target"] == 0
    assert rows["x"]["time_vs_baseline"] == pytest.approx(1.5)
    assert rounds_to_target([{"round": 0, "test_accuracy": 0.9}], 0.5) is None  # round 0 never counts


def test_report_uses_a_split_specific_target_where_the_grid_sets_one():
    grid = Grid("g", "d", {}, {"fedavg": {}}, ("iid", "path2"), (0,), target_accuracy=0.5,
                split_targets={"path2": 0.3})
    summaries = {
        "fedavg__iid__s0": _summary(0.6, [0.1, 0.4, 0.6], 2.0),
        "fedavg__path2__s0": _summary(0.4, [0.1, 0.35, 0.4], 2.0),
    }
    rows = {r["split"]: r for r in aggregate(grid, summaries)}
    assert rows["iid"]["rounds_to_target_mean"] == 2 and rows["iid"]["target_accuracy"] == 0.5
    assert rows["path2"]["rounds_to_target_mean"] == 1 and rows["path2"]["target_accuracy"] == 0.3
    assert "path2 (target 30%)" in markdown_table(grid, aggregate(grid, summaries))


def test_status_says_how_a_run_ended(tmp_path):
    """completed when some round's aggregate was kept; no-progress when none was (e.g.
    every reply rejected); failed, with the error, when the ServerApp raised."""
    import json

    from fl_app.results import RunRecorder, run_status

    def recorder(name):
        (tmp_path / name).mkdir()
        return RunRecorder(tmp_path / name, {"num-server-rounds": 2}, {})

    ok = recorder("ok")
    assert run_status(tmp_path / "ok") is None  # nothing written yet but the config
    ok.add_round({"round": 0, "test_accuracy": 0.1})
    assert run_status(tmp_path / "ok") == "running"
    ok.add_round({"round": 1, "test_accuracy": 0.5, "round_aggregated": 1})
    assert ok.finish({})["status"] == "completed"
    stuck = recorder("stuck")
    for r in (0, 1, 2):
        stuck.add_round({"round": r, "test_accuracy": 0.1, "round_aggregated": 0})
    assert stuck.finish({})["status"] == "no-progress" and run_status(tmp_path / "stuck") == "no-progress"
    broken = recorder("broken")
    broken.add_round({"round": 0, "test_accuracy": 0.1})
    broken.fail(RuntimeError("node vanished"))
    summary = json.loads((tmp_path / "broken" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: node vanished"
    assert summary["complete"] is False
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "summary.json").write_text(json.dumps({"complete": True}))
    assert run_status(legacy) == "completed"
