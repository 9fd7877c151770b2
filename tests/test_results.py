"""Results: nothing is overwritten, summaries are complete-or-marked, reports aggregate right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.grids import Grid
from deploy.launch import run_config_arg, toml_value
from experiments.report import aggregate, markdown_table, rounds_to_target
from fl_app.results import RunRecorder, fresh_run_dir, is_complete, load_model, resolve_results_dir


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
    assert np.array_equal(load_model(run_dir / "final_model.npz")["w"], np.zeros(2))
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


# ---------------------------------------------------------------- the grids and the report
def _grid_cases():
    from experiments.grids import GRIDS

    return sorted(GRIDS)


@pytest.mark.parametrize("name", _grid_cases())
def test_every_grid_run_has_a_unique_parsable_name_and_a_valid_config(name):
    """What experiments/run_grid.py submits as one sweep: every entry validates as the
    ServerApp will validate it (the app's defaults, then the entry: fl_app.config's
    load_sweep), its run name is unique and parses back to its label, split and seed,
    and the strategy is feasible with the grid's number of nodes."""
    import strategies
    from experiments.grids import GRIDS, SPLITS
    from fl_app.config import RunConfig, default_run_config

    grid = GRIDS[name]
    assert grid.name == name and grid.baseline in grid.strategies
    assert set(grid.splits) <= set(SPLITS)
    runs = grid.runs()
    names = [run["run-name"] for run in runs]
    assert len(names) == len(set(names)) == sum(
        len(grid.seeds_for(split)) for split in grid.splits) * len(grid.strategies)
    expected = {f"{label}__{split}__s{seed}" for split in grid.splits
                for seed in grid.seeds_for(split) for label in grid.strategies}
    assert set(names) == expected
    for run in runs:
        label, split, seed = Grid.parse_run_name(run["run-name"])
        assert label in grid.strategies and split in grid.splits and seed == run["seed"]
        assert {k: run[k] for k in SPLITS[split]} == SPLITS[split]
        assert all(run[k] == v for k, v in grid.strategies[label].items())
        cfg = RunConfig.from_mapping({**default_run_config(), **run})
        assert cfg.run_name == run["run-name"] and cfg.seed == seed
        assert cfg.strategy == grid.strategies[label]["strategy"]
        strategies.check_feasible(cfg, grid.num_supernodes)
        assert cfg.num_attackers <= grid.num_supernodes
    # a subset of the seeds keeps the names
    assert {r["run-name"] for r in grid.runs(grid.seeds[:1])} <= set(names)


def test_a_split_with_its_own_seeds_runs_every_strategy_on_those_and_only_those():
    """fedper-fmnist-100c's Dirichlet(0.1) split cannot be drawn with seed 2 at 100
    clients: that split runs on seeds 0, 1, 3, every strategy on the same three."""
    from experiments.grids import GRIDS

    grid = GRIDS["fedper-fmnist-100c"]
    names = {run["run-name"] for run in grid.runs()}
    for label in grid.strategies:
        assert {f"{label}__dir0.1__s{s}" for s in (0, 1, 3)} <= names
        assert f"{label}__dir0.1__s2" not in names
        assert f"{label}__iid__s2" in names and f"{label}__iid__s3" not in names
    assert len(names) == 4 * 4 * 3
    assert {r["run-name"] for r in grid.runs((3,))} == {
        f"{label}__dir0.1__s3" for label in grid.strategies}


def _write_summary(runs_dir, name, final, accuracies, seconds, upload, complete=True):
    """A summary.json as fl_app.results.RunRecorder writes it (round 0 = the initial model)."""
    history = []
    for r, acc in enumerate(accuracies):
        record = {"round": r, "test_accuracy": acc, "test_loss": 2.0 - acc,
                  "round_seconds": 0.0 if r == 0 else 99.0}  # not what the table shows
        if r > 0:
            record.update({"train_seconds": seconds[r - 1] if isinstance(seconds, list) else seconds,
                           "upload_bytes_per_client": upload, "replies_valid": 2,
                           "round_aggregated": 1})
        history.append(record)
    history[-1]["test_accuracy"] = final
    (runs_dir / name).mkdir(parents=True)
    (runs_dir / name / "summary.json").write_text(json.dumps({
        "complete": complete, "status": "completed" if complete else "running",
        "run_name": name, "num_rounds": len(accuracies) - 1,
        "rounds_completed": len(accuracies) - 1, "final_test_accuracy": final,
        "final_test_loss": 2.0 - final,
        "best_test_accuracy": max(a["test_accuracy"] for a in history),
        "num_partitions": 4, "config": {"run-name": name}, "history": history,
    }))


def test_write_report_tabulates_the_numbers_of_the_summaries(tmp_path):
    """Three complete runs and an incomplete one, written by hand:

    fedavg s0: accuracies 0.1, 0.55, 0.60 (target 0.5 first at round 1), 2 s a warm round
    fedavg s1: 0.1, 0.40, 0.70 (target at round 2), 2 s
    fedprox s0: 0.1, 0.30, 0.50 (target at round 2), train seconds 9 (round 1, left out)
               then 3 s; s1 incomplete (left out)
    -> fedavg: final 65.00 ± 7.07 (sample std of 0.6, 0.7), best 65.00, rounds to 50%
       1.5 (2/2), 2 s a round; fedprox: 50.00 ± 0.00, 1 seed, 2.0 (1/1), 3 s, 1.5x fedavg;
       uploads 2048 and 4096 bytes = 2 and 4 KiB."""
    import csv

    from experiments.report import write_report

    grid = Grid("tiny", "A tiny grid.", {"dataset": "digits"},
                {"fedavg": {"strategy": "fedavg"}, "fedprox": {"strategy": "fedprox"}},
                ("iid",), (0, 1), target_accuracy=0.5)
    runs = tmp_path / "runs"
    _write_summary(runs, "fedavg__iid__s0", 0.60, [0.1, 0.55, 0.60], 2.0, 2048)
    _write_summary(runs, "fedavg__iid__s1", 0.70, [0.1, 0.40, 0.70], 2.0, 2048)
    _write_summary(runs, "fedprox__iid__s0", 0.50, [0.1, 0.30, 0.50], [9.0, 3.0], 4096)
    _write_summary(runs, "fedprox__iid__s1", 0.90, [0.1, 0.90], 1.0, 4096, complete=False)
    (runs / "scratch").mkdir()  # not a grid run: no "__"
    (runs / "scratch" / "summary.json").write_text(json.dumps({"complete": True}))

    rows = write_report(grid, tmp_path)
    with (tmp_path / "table.csv").open() as handle:
        table = {r["strategy"]: r for r in csv.DictReader(handle)}
    assert [r["strategy"] for r in rows] == list(table) == ["fedavg", "fedprox"]
    fedavg, fedprox = table["fedavg"], table["fedprox"]
    assert (fedavg["split"], int(fedavg["seeds"]), int(fedprox["seeds"])) == ("iid", 2, 1)
    assert float(fedavg["final_acc_mean"]) == pytest.approx(0.65)
    assert float(fedavg["final_acc_std"]) == pytest.approx(0.0707106781)
    assert float(fedavg["best_acc_mean"]) == pytest.approx(0.65)
    assert float(fedavg["rounds_to_target_mean"]) == pytest.approx(1.5)
    assert int(fedavg["reached_target"]) == 2
    assert float(fedavg["train_seconds_per_round"]) == pytest.approx(2.0)
    assert float(fedavg["time_vs_baseline"]) == pytest.approx(1.0)
    assert float(fedavg["upload_bytes_per_client"]) == 2048
    assert float(fedprox["final_acc_mean"]) == pytest.approx(0.5)
    assert float(fedprox["final_acc_std"]) == 0.0
    assert float(fedprox["rounds_to_target_mean"]) == 2.0 and int(fedprox["reached_target"]) == 1
    assert float(fedprox["train_seconds_per_round"]) == pytest.approx(3.0)  # round 1 left out
    assert float(fedprox["time_vs_baseline"]) == pytest.approx(1.5)
    assert float(fedprox["upload_bytes_per_client"]) == 4096
    md = (tmp_path / "table.md").read_text()
    assert "3 of 4 runs complete" in md
    assert "| iid | fedavg | 2 | 65.00 ± 7.07 | 65.00 | 1.5 (2/2) | 2 KiB |" in md
    assert "| iid | fedprox | 1 | 50.00 ± 0.00 | 50.00 | 2.0 (1/1) | 4 KiB |" in md
    assert "| rounds to 50% |" in md
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_the_runner_names_finished_runs_recorded_by_other_code(tmp_path):
    """run_grid warns before it adds runs to a grid whose finished runs another code
    version recorded (their config has other keys): the report would refuse to pair them.
    A run this code recorded is not named; an unfinished one is not looked at."""
    from experiments.run_grid import recorded_by_other_code
    from fl_app.config import RunConfig, default_run_config

    runs = [{"run-name": f"fedavg__iid__s{seed}", "strategy": "fedavg", "seed": seed}
            for seed in range(4)]
    current = RunConfig.from_mapping({**default_run_config(), **runs[0]}).resolved()
    older = {k: v for k, v in current.items() if k not in ("checkpoint", "device")}
    newer = {**current, "a-future-key": 1}
    for run, config, complete in zip(runs, (current, older, newer, older),
                                     (True, True, True, False)):
        (tmp_path / run["run-name"]).mkdir()
        (tmp_path / run["run-name"] / "summary.json").write_text(
            json.dumps({"complete": complete, "config": config}))
    other = recorded_by_other_code(tmp_path, runs)
    assert set(other) == {"fedavg__iid__s1", "fedavg__iid__s2"}
    assert other["fedavg__iid__s1"] == "lacks 2 key(s) (checkpoint, device)"
    assert other["fedavg__iid__s2"] == "has another 1 key(s) (a-future-key)"


def test_the_runner_hands_the_server_an_absolute_sweep_file_for_a_relative_out(tmp_path, monkeypatch):
    """The ServerApp reads the sweep file from the installed FAB's directory, not from where
    run_grid was started: a relative ``--out`` once reached it as a relative path and every
    run was refused ("no such file"). The paths handed to the run must be absolute and name
    the files run_grid wrote."""
    from experiments import run_grid

    handed: list[dict] = []

    class FakeLink:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def run(self, config, **kwargs):
            handed.append(config)
            return type("Proc", (), {"returncode": 0})()

    monkeypatch.setattr(run_grid, "LocalSuperLink", FakeLink)
    monkeypatch.chdir(tmp_path)
    run_grid.main(["smoke", "--out", "relative-out"])
    assert len(handed) == 1
    sweep, results = Path(handed[0]["sweep-file"]), Path(handed[0]["results-dir"])
    assert sweep.is_absolute() and results.is_absolute()
    assert sweep == tmp_path / "relative-out" / "smoke" / "sweep.json" and sweep.is_file()
    assert results == tmp_path / "relative-out" / "smoke" / "runs"
