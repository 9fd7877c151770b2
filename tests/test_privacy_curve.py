"""experiments/privacy_curve.py: the privacy-utility table from hand-made records, checked
against values computed by hand, and docs_check naming a curve.md that drifted."""

from __future__ import annotations

import json

from experiments import docs_check as dc
from experiments.privacy_curve import build_curve


def _run(runs, name: str, accuracies: list[float], epsilon=None, sigma=None,
         status: str = "completed") -> None:
    """A summary.json with test accuracy per round (round 0 first), as the app writes it."""
    history = [{"round": r, "test_accuracy": a} for r, a in enumerate(accuracies)]
    if epsilon is not None:
        history[-1].update(dp_epsilon_max=epsilon, dp_noise_multiplier=sigma)
    (runs / name).mkdir(parents=True)
    (runs / name / "summary.json").write_text(json.dumps(
        {"status": status, "final_test_accuracy": accuracies[-1], "history": history}))


def test_the_curve_table_is_what_the_records_give_by_hand(tmp_path):
    runs = tmp_path / "runs"
    # 12 trained rounds each: the last-10 mean leaves out rounds 1 and 2 and takes
    # round 3, 2 points below the rest: 0.2 points below the final round.
    flat = lambda first, rest: [0.1, first, first, rest - 0.02] + [rest] * 9  # noqa: E731
    _run(runs, "nodp__iid__s0", flat(0.5, 0.90))
    _run(runs, "nodp__iid__s1", flat(0.5, 0.88))
    _run(runs, "eps2__iid__s0", flat(0.2, 0.80), epsilon=1.99, sigma=1.6)
    _run(runs, "eps2__iid__s1", flat(0.2, 0.76), epsilon=2.01, sigma=1.8)
    _run(runs, "eps2__iid__s2", flat(0.2, 0.70), epsilon=2.00, sigma=1.7)  # no no-DP pair
    _run(runs, "eps8__iid__s0", flat(0.2, 0.85), epsilon=8.0, sigma=0.6, status="running")
    text, cells = build_curve(runs)
    rows = [line for line in text.splitlines() if line.startswith("| iid")]
    assert rows == [
        # mean 75.33, std of (80, 76, 70) = 5.03; cost over seeds 0 and 1 only:
        # (80 - 90 + 76 - 88) / 2 = -11.00, the same for the last-10 means
        "| iid | target 2 | 0, 1, 2 | 2.00 | 1.700 | 75.33 ± 5.03 | 75.13 ± 5.03 | -11.00; -11.00 |",
        "| iid | no DP | 0, 1 | – | – | 89.00 ± 1.41 | 88.80 ± 1.41 | – |",
    ]
    assert ("iid", "eps8") not in cells  # a run that did not finish is left out
    # The cost table: seeds 0 and 1 pair, differences -10 and -12 points: mean -11, std
    # sqrt(2), so the 95 % half-width is t(0.975, 1) * sqrt(2) / sqrt(2) = 12.706.
    cost = text.split("What DP-SGD costs")[1].splitlines()
    assert cost[2:] == [
        "| target epsilon | iid: final round (seeds 0, 1) | iid: last 10 rounds |",
        "|---|---|---|",
        "| 2 | -11.00 [-23.71, +1.71] | -11.00 [-23.71, +1.71] |",
    ]


def test_docs_check_names_a_curve_that_drifted_from_its_records(tmp_path):
    grid = tmp_path / "results" / "privacy-fmnist"
    _run(grid / "runs", "nodp__iid__s0", [0.1] + [0.9] * 10)
    _run(grid / "runs", "eps1__iid__s0", [0.1] + [0.7] * 10, epsilon=1.0, sigma=2.0)
    (grid / "curve.md").write_text(build_curve(grid / "runs")[0])
    assert dc.check_curves(tmp_path / "results") == []
    (grid / "curve.md").write_text((grid / "curve.md").read_text().replace("70.00", "71.00"))
    problems = dc.check_curves(tmp_path / "results")
    assert [p.where for p in problems] == ["results/privacy-fmnist/curve.md"]
    assert "experiments.privacy_curve" in problems[0].what
