"""The report's paired table: it checks the pairing from the records and refuses unpaired
rows; it gives the last-10-rounds mean, paired differences, t-intervals and p-values.

Every record here is written by hand in tmp_path, as fl_app.results.RunRecorder writes a
summary.json (round 0 = the initial model)."""

from __future__ import annotations

import json

import pytest

from experiments.grids import GRIDS, Grid
from experiments.report import (PairingError, comparisons, last_rounds_mean, main,
                                must_start_identically, paired_differences, write_report)

GRID = Grid("pairs", "FedAvg and SCAFFOLD, 12 rounds.", {"dataset": "digits"},
            {"fedavg": {"strategy": "fedavg"},
             "scaffold": {"strategy": "scaffold", "server-lr": 1.0,
                          "scaffold-control-variate": "gradient-mean"},
             "fedprox": {"strategy": "fedprox", "proximal-mu": 0.01}},
            ("iid",), (0, 1, 2), target_accuracy=0.7)

# Test accuracy of rounds 1..12 (round 0 is 0.1 everywhere): FedAvg's plateau 0.70 / 0.72
# / 0.74 from round 3; SCAFFOLD the same round 1, 0.65 in round 2, a plateau of 0.70 / 0.73
# / 0.76 and a final round 0.01 above its plateau; FedProx another round 1 and 0.71.
CURVES = {
    ("fedavg", 0): [0.5, 0.6] + [0.70] * 10,
    ("fedavg", 1): [0.5, 0.6] + [0.72] * 10,
    ("fedavg", 2): [0.5, 0.6] + [0.74] * 10,
    ("scaffold", 0): [0.5, 0.65] + [0.70] * 9 + [0.71],
    ("scaffold", 1): [0.5, 0.65] + [0.73] * 9 + [0.74],
    ("scaffold", 2): [0.5, 0.65] + [0.76] * 9 + [0.77],
    **{("fedprox", seed): [0.55, 0.6] + [0.71] * 10 for seed in (0, 1, 2)},
}


def _config(label: str, seed: int, runs_dir) -> dict:
    """The full config a run records: the app's defaults, then the grid's entry."""
    return {"strategy": "fedavg", "num-server-rounds": 12, "lr": 0.05, "momentum": 0.9,
            "dataset": "digits", "partitioner": "iid", "proximal-mu": 0.01,
            "scaffold-control-variate": "gradient-mean", "server-lr": 1.0, "seed": seed,
            **GRID.strategies[label], "run-name": f"{label}__iid__s{seed}",
            "results-dir": str(runs_dir), "sweep-file": ""}


def write_run(runs_dir, label, seed, curve=None, *, round1_loss=None, round0_loss=2.3,
              config=None, partition_sizes=(100, 100, 100)):
    name = f"{label}__iid__s{seed}"
    curve = curve or CURVES[(label, seed)]
    history = [{"round": 0, "test_accuracy": 0.1, "test_loss": round0_loss, "round_seconds": 0.0}]
    for r, acc in enumerate(curve, start=1):
        history.append({"round": r, "test_accuracy": acc, "test_loss": 2.0 - acc,
                        "round_seconds": 1.0, "train_seconds": 1.0,
                        "upload_bytes_per_client": 1024, "replies_valid": 3})
    # round 1: the same loss for every strategy of a seed unless told otherwise
    history[1]["test_loss"] = 1.5 + 0.01 * seed if round1_loss is None else round1_loss
    cfg = {**_config(label, seed, runs_dir), **(config or {})}
    cfg = {k: v for k, v in cfg.items() if v is not None}  # None: a key this run lacks
    (runs_dir / name).mkdir(parents=True, exist_ok=True)
    (runs_dir / name / "summary.json").write_text(json.dumps({
        "complete": True, "status": "completed", "run_name": name, "num_rounds": len(curve),
        "rounds_completed": len(curve), "final_test_accuracy": curve[-1],
        "final_test_loss": 2.0 - curve[-1], "best_test_accuracy": max(curve),
        "num_partitions": 3, "num_nodes": 3, "partition_sizes": list(partition_sizes),
        "model_parameters": 1000, "dataset": {"num_classes": 10}, "config": cfg,
        "history": history}))
    return name


def paired_records(tmp_path, labels=("fedavg", "scaffold")):
    runs = tmp_path / "runs"
    for label in labels:
        for seed in GRID.seeds:
            write_run(runs, label, seed)
    return runs


def _only(grid_labels):
    """GRID restricted to the given labels (the baseline first)."""
    return Grid(GRID.name, GRID.description, GRID.base,
                {k: GRID.strategies[k] for k in grid_labels}, GRID.splits, GRID.seeds,
                target_accuracy=GRID.target_accuracy)


# ---------------------------------------------------------------- refused
def test_a_pair_whose_round_1_differs_where_it_must_not_is_refused_by_name(tmp_path):
    """SCAFFOLD with eta_g = 1 has c = 0 in round 1: its round 1 is FedAvg's. Seed 1's
    SCAFFOLD run has another round-1 loss (as the fmnist-niid reruns from newer code do):
    no table, and the message names that pair and no other."""
    runs = paired_records(tmp_path)
    write_run(runs, "scaffold", 1, round1_loss=1.52)
    grid = _only(("fedavg", "scaffold"))
    with pytest.raises(PairingError) as error:
        write_report(grid, tmp_path)
    message = str(error.value)
    assert "1 of 3 run pairs" in message
    assert "scaffold__iid__s1 vs fedavg__iid__s1: round 1 must equal" in message
    assert "1.520000 vs 1.510000" in message
    assert "s0 vs" not in message and "s2 vs" not in message
    assert not (tmp_path / "table.md").exists() and not (tmp_path / "table.csv").exists()


def test_a_pair_whose_config_differs_outside_the_compared_keys_is_refused(tmp_path):
    runs = paired_records(tmp_path)
    write_run(runs, "fedavg", 2, config={"lr": 0.1})
    with pytest.raises(PairingError, match=r"scaffold__iid__s2 vs fedavg__iid__s2: config "
                                           r"differs in lr \(0.05 vs 0.1\)"):
        paired_differences(_only(("fedavg", "scaffold")), _load(runs))


def test_pairs_on_other_data_or_another_initial_model_are_refused(tmp_path):
    runs = paired_records(tmp_path)
    write_run(runs, "scaffold", 0, partition_sizes=(150, 100, 50))
    write_run(runs, "scaffold", 2, round0_loss=2.4)
    with pytest.raises(PairingError) as error:
        paired_differences(_only(("fedavg", "scaffold")), _load(runs))
    assert "scaffold__iid__s0 vs fedavg__iid__s0: different partition_sizes" in str(error.value)
    assert "scaffold__iid__s2 vs fedavg__iid__s2: round 0 (the initial model) differs" in str(error.value)


def test_records_from_other_code_versions_pass_only_with_round_1_as_evidence(tmp_path):
    """A key recorded by one run only means another code version. SCAFFOLD's round 1 must
    equal FedAvg's, and does: accepted, and the table says what the pairing rests on.
    FedProx (mu 0.01) starts differently, so nothing shows the code did not change: refused."""
    runs = paired_records(tmp_path, labels=("fedavg", "scaffold", "fedprox"))
    for seed in GRID.seeds:
        write_run(runs, "scaffold", seed, config={"attack": "none"})
    rows = paired_differences(_only(("fedavg", "scaffold")), _load(runs))
    assert {r["paired_by"] for r in rows} == {"round 1 (code versions differ)"}

    write_run(runs, "fedprox", 0, config={"attack": "none"})
    with pytest.raises(PairingError, match=r"fedprox__iid__s0 vs fedavg__iid__s0: config keys "
                                           r"recorded by one run only \(different code "
                                           r"versions\): attack only in fedprox__iid__s0"):
        paired_differences(GRID, _load(runs))


def test_the_command_prints_the_refusal_and_exits_2(tmp_path, monkeypatch, capsys):
    runs = paired_records(tmp_path / GRID.name)
    write_run(runs, "scaffold", 1, round1_loss=1.52)
    monkeypatch.setitem(GRIDS, GRID.name, _only(("fedavg", "scaffold")))
    assert main([GRID.name, "--out", str(tmp_path)]) == 2
    assert "scaffold__iid__s1 vs fedavg__iid__s1" in capsys.readouterr().err


def test_a_replaced_set_of_records_is_reported_from_its_own_folder(tmp_path, monkeypatch, capsys):
    """After a rerun the old records move aside (fmnist-niid/superseded-2026-12/): ``--runs``
    reports them alone, with ``--also`` on top, and never mixes in the grid's new runs."""
    monkeypatch.setitem(GRIDS, GRID.name, _only(("fedavg", "scaffold")))
    paired_records(tmp_path / GRID.name)  # the new records: seed-1 SCAFFOLD round 1 agrees
    old = tmp_path / "old"
    for label in ("fedavg", "scaffold"):
        for seed in GRID.seeds:
            write_run(old, label, seed, curve=[0.5, 0.6] + [0.80] * 10)
    fixed = tmp_path / "fixed"
    write_run(fixed, "scaffold", 1, round1_loss=1.52)  # replaces old's seed-1 SCAFFOLD
    assert main([GRID.name, "--out", str(tmp_path), "--runs", str(old)]) == 0
    assert "| iid | scaffold − fedavg | 3 | +0.00 [+0.00, +0.00]" in capsys.readouterr().out
    assert main([GRID.name, "--out", str(tmp_path), "--runs", str(old), "--also", str(fixed)]) == 2
    assert "scaffold__iid__s1 vs fedavg__iid__s1: round 1 must equal" in capsys.readouterr().err
    assert main([GRID.name, "--out", str(tmp_path), "--runs", str(tmp_path / "none")]) == 2
    assert "no run folder" in capsys.readouterr().err


# ---------------------------------------------------------------- printed
def test_a_paired_table_prints_last_10_means_differences_intervals_and_p(tmp_path):
    """Hand-computed from CURVES:

    last 10 rounds = rounds 3..12: FedAvg 0.70 / 0.72 / 0.74 (mean 72.00, std 2.00);
    SCAFFOLD (9 x 0.70 + 0.71) / 10 = 0.701, 0.731, 0.761 (mean 73.10, std 3.00).
    Per-seed differences, final: +1, +2, +3 pp; last 10: +0.1, +1.1, +2.1 pp. Both have
    sample std 1 pp, so the standard error is 1 / sqrt(3) = 0.57735 pp, and with 2 degrees
    of freedom t_0.975 = 0.95 / sqrt(2 x 0.975 x 0.025) = 4.302653: half-width 2.48414 pp.
    final: +2.00 [-0.48, +4.48], t = 2 sqrt(3) = 3.4641, p = 1 - t / sqrt(t^2 + 2)
    = 1 - 3.4641 / sqrt(14) = 0.07418; last 10: +1.10 [-1.38, +3.58], t = 1.1 sqrt(3) =
    1.90526, p = 1 - 1.90526 / sqrt(5.63) = 0.19703 (the t distribution with 2 degrees of
    freedom in closed form)."""
    paired_records(tmp_path)
    grid = _only(("fedavg", "scaffold"))
    write_report(grid, tmp_path)

    assert last_rounds_mean(_load(tmp_path / "runs")["scaffold__iid__s0"]["history"]) == \
        pytest.approx(0.701)
    (row,) = paired_differences(grid, _load(tmp_path / "runs"))
    assert (row["strategy"], row["reference"], row["seeds"]) == ("scaffold", "fedavg", 3)
    assert row["final_diffs"] == pytest.approx([0.01, 0.02, 0.03])
    assert row["last10_diffs"] == pytest.approx([0.001, 0.011, 0.021])
    half = 4.302653 * 0.01 / 3 ** 0.5
    assert row["final_diff"] == pytest.approx(0.02)
    assert (row["final_ci_low"], row["final_ci_high"]) == pytest.approx((0.02 - half, 0.02 + half))
    assert row["final_p"] == pytest.approx(1 - 12 ** 0.5 / 14 ** 0.5)
    assert row["last10_diff"] == pytest.approx(0.011)
    assert (row["last10_ci_low"], row["last10_ci_high"]) == pytest.approx((0.011 - half, 0.011 + half))
    assert row["last10_p"] == pytest.approx(1 - (3 * 1.1 ** 2) ** 0.5 / (3 * 1.1 ** 2 + 2) ** 0.5)
    assert row["paired_by"] == "config + round 1"

    md = (tmp_path / "table.md").read_text()
    assert "| iid | fedavg | 3 | 72.00 ± 2.00 |" in md
    assert "| iid | scaffold | 3 | 74.00 ± 3.00 |" in md
    assert "| 1 KiB | 72.00 ± 2.00 |" in md and "| 1 KiB | 73.10 ± 3.00 |" in md
    assert ("| iid | scaffold − fedavg | 3 | +2.00 [-0.48, +4.48], p = 0.074 | "
            "+1.10 [-1.38, +3.58], p = 0.197 | +1.0, +2.0, +3.0; +0.1, +1.1, +2.1 | "
            "config + round 1 |") in md
    assert (tmp_path / "paired.csv").read_text().splitlines()[0].startswith(
        "split,strategy,reference,seeds,paired_by,final_diff")


def test_pairs_only_over_the_seeds_both_have_and_one_seed_has_no_interval(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "fedavg", 0)
    write_run(runs, "scaffold", 0)
    write_run(runs, "scaffold", 1)  # no FedAvg run for seed 1: not a pair
    (row,) = paired_differences(_only(("fedavg", "scaffold")), _load(runs))
    assert row["seeds"] == 1 and row["final_diff"] == pytest.approx(0.01)
    write_report(_only(("fedavg", "scaffold")), tmp_path)
    assert "| +1.00 (1 seed) | +0.10 (1 seed) |" in (tmp_path / "table.md").read_text()


def test_each_strategy_is_compared_with_the_baseline_strategy_in_its_own_setting():
    """scaffold-logreg with fedavg-logreg, not with fedavg-cnn or the grid's baseline."""
    assert ("scaffold-logreg", "fedavg-logreg") in comparisons(GRIDS["scaffold-100c"])
    assert ("scaffold-cnn", "fedavg-cnn") in comparisons(GRIDS["scaffold-100c"])
    # and a strategy with a setting against itself without it (what SecAgg+ costs SCAFFOLD)
    assert comparisons(GRIDS["secagg-digits"]) == [
        ("fedavg-secagg", "fedavg"), ("scaffold", "fedavg"),
        ("scaffold-secagg", "fedavg-secagg"), ("scaffold-secagg", "scaffold")]
    robustness = comparisons(GRIDS["robustness-digits"])
    assert ("krum-alie1", "fedavg-alie1") in robustness and ("krum-alie1", "krum-none") in robustness
    assert ("fedavg-alie1", "fedavg-none") in robustness  # the attack's damage
    assert ("krum-none", "fedavg-none") in robustness
    assert dict(comparisons(GRIDS["privacy-fmnist"]))["eps1"] == "nodp"


FEDAVG = {"strategy": "fedavg", "server-lr": 1.0, "lr": 0.05, "proximal-mu": 0.01,
          "server-momentum": 0.9, "scaffold-control-variate": "gradient-mean"}


@pytest.mark.parametrize("overrides, same", [
    ({"strategy": "scaffold"}, True),  # c = 0 in round 1, eta_g = 1
    ({"strategy": "scaffold", "scaffold-control-variate": "displacement"}, True),
    ({"strategy": "scaffold", "server-lr": 0.5}, False),
    ({"strategy": "scaffold", "scaffold-weighting": "uniform"}, False),  # another mean
    ({"strategy": "fedavgm"}, True),  # the momentum buffer is empty in round 1
    ({"strategy": "fedavgm", "server-lr": 0.5}, False),
    ({"strategy": "fedprox", "proximal-mu": 0.0}, True),
    ({"strategy": "fedprox"}, False),  # mu 0.01
    ({"strategy": "fedadam", "server-lr": 0.03}, False),
    ({"strategy": "fedavg", "lr": 0.1}, False),
    ({"strategy": "fedprox", "proximal-mu": None}, False),  # a record without its mu
])
def test_which_runs_must_start_identically(overrides, same):
    """Against FedAvg's recorded config (None: a key the other record lacks)."""
    other = {k: v for k, v in {**FEDAVG, **overrides}.items() if v is not None}
    compared = set(overrides) | {"strategy"}
    assert must_start_identically(other, FEDAVG, compared) is same
    assert must_start_identically(FEDAVG, other, compared) is same


def _load(runs_dir):
    from experiments.report import load_summaries

    return load_summaries(runs_dir)


def test_a_comparison_of_starting_points_needs_no_common_round_0(tmp_path):
    """FedLoRA's grid compares training from scratch with runs from a pretrained base
    (init-from, lora-base): their round 0 differs by design, and the model's size with the
    adapters; the same difference between two runs that do not vary the start is refused."""
    from experiments.report import check_pairing

    runs = tmp_path / "runs"
    name = write_run(runs, "fedavg", 0, CURVES[("fedavg", 0)])
    scratch = json.loads((runs / name / "summary.json").read_text())
    scratch["config"]["init-from"] = ""
    base = json.loads(json.dumps(scratch))
    base["history"][0]["test_loss"], base["model_parameters"] = 0.9, 1500
    base["config"]["init-from"], base["config"]["init-from-sha256"] = "/b.npz", "ab" * 32
    grid = Grid("starts", "scratch against a base", {"dataset": "digits"},
                {"scratch": {"strategy": "fedavg"},
                 "finetune": {"strategy": "fedavg", "init-from": "/b.npz"}}, ("iid",), (0,),
                baseline="scratch")
    records = {"scratch__iid__s0": scratch, "finetune__iid__s0": base}
    assert check_pairing(grid, records)
    base["config"]["init-from"] = ""
    plain = Grid("same", "x", {}, {"scratch": {"strategy": "fedavg"},
                                   "finetune": {"strategy": "fedavg", "lr": 0.05}}, ("iid",), (0,),
                 baseline="scratch")
    with pytest.raises(PairingError, match="round 0"):
        check_pairing(plain, records)


def test_the_personalization_table_has_seed_means_spreads_local_only_and_paired_differences():
    """val_accuracy after the last round, by hand: FedAvg + FT 0.80 / 0.82 / 0.84, FedPer
    0.85 / 0.86 / 0.90 (differences +5, +4, +6 points: mean +5, sd 1, t-interval
    +5 ± 4.303 * 1 / sqrt(3) = [+2.52, +7.48], p = 0.0132), FedAvg's global model without
    a spread; local only from its own record, seed 7 (not the grid's) left out."""
    from experiments.report import personalized_markdown

    grid = Grid("pers", "FedPer", {"dataset": "digits"},
                {"fedavg": {"strategy": "fedavg"},
                 "fedavg-ft": {"strategy": "fedavg", "eval-finetune-epochs": 1},
                 "fedper1": {"strategy": "fedper", "personal-layers": 1}},
                ("dir0.1",), (0, 1, 2))
    val = {"fedavg": [0.70, 0.72, 0.74], "fedavg-ft": [0.80, 0.82, 0.84],
           "fedper1": [0.85, 0.86, 0.90]}
    summaries = {}
    for label, values in val.items():
        for seed, v in enumerate(values):
            last = {"round": 10, "val_accuracy": v}
            if label != "fedavg":
                last["val_accuracy_std"] = 0.05 + 0.01 * seed
            summaries[f"{label}__dir0.1__s{seed}"] = {"history": [{"round": 0}, last]}
    local = {f"dir0.1__s{s}": {"val_accuracy": v, "val_accuracy_std": 0.1}
             for s, v in [(0, 0.6), (1, 0.7), (2, 0.8), (7, 0.0)]}
    text = personalized_markdown(grid, summaries, local)
    assert "| dir0.1 | 72.0 ± 2.0 (3) | 82.0 ± 2.0 (3) [6.0] | 87.0 ± 2.6 (3) [6.0] | " \
           "70.0 ± 10.0 (3) [10.0] |" in text
    assert "| dir0.1 | fedper1 − fedavg-ft | 3 | +5.00 | [+2.52, +7.48] | 0.013 | " \
           "+5.0, +4.0, +6.0 |" in text
    assert personalized_markdown(grid, {k: {"history": [{"round": 10}]} for k in summaries}) == ""
