"""experiments/robustness_table.py's table of attackers kept: read from the records, by seed
in seed order (the docs once listed them in the wrong order, issue 24)."""

from __future__ import annotations

import json

from experiments.robustness_table import build_matrix, collect_kept


def _record(results, name: str, selected: list, accuracy: float = 0.5) -> None:
    run = results / "robustness-digits" / "runs" / name
    run.mkdir(parents=True)
    history = [{"round": 0}] + [{"round": r, "attackers_selected": v}
                                for r, v in enumerate(selected, start=1)]
    run.joinpath("summary.json").write_text(json.dumps(
        {"status": "completed", "final_test_accuracy": accuracy, "history": history}))


def test_kept_attackers_are_summed_over_rounds_and_listed_in_seed_order(tmp_path):
    # written seed 2 first: the table must still read s0 / s1 / s2
    _record(tmp_path, "krum-ipm2__iid__s2", [1, 0, 1])
    _record(tmp_path, "krum-ipm2__iid__s0", [0, 0, 0])
    _record(tmp_path, "krum-ipm2__iid__s1", [1, 1, 1])
    _record(tmp_path, "multikrum-ipm2__iid__s0", [2, 2, 1])
    _record(tmp_path, "fedavg-ipm2__iid__s0", [None, None, None])  # FedAvg selects nothing
    _record(tmp_path, "krum-none__iid__s0", [None, None, None])
    kept = collect_kept("robustness-digits", tmp_path)
    assert kept[("iid", "krum", "ipm2")] == {0: 0, 1: 3, 2: 2}
    assert kept[("iid", "multikrum", "ipm2")] == {0: 5}
    assert ("iid", "fedavg", "ipm2") not in kept and ("iid", "krum", "none") not in kept
    text = build_matrix("robustness-digits", tmp_path)
    section = text[text.index("## Attackers' replies kept, 2 attackers"):]
    assert "| attack | krum | multikrum |" in section and "fedavg" not in section
    assert "| ipm2 | 0 / 3 / 2 | 5 |" in section
