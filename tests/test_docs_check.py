"""The docs' results tables are what their committed records give (experiments/docs_check.py):
each grid's table.md regenerates exactly, and a table the docs include is the generated one."""

from __future__ import annotations

from experiments import docs_check as dc


def _lower_final_accuracy(summary_path, by: float) -> None:
    """Edit one committed record, as a rerun or a hand edit would."""
    import json

    summary = json.loads(summary_path.read_text())
    summary["final_test_accuracy"] -= by
    summary_path.write_text(json.dumps(summary))


def test_every_grid_table_and_every_included_table_matches_its_records():
    problems = (dc.check_included(dc.doc_files()) + dc.check_grid_tables() + dc.check_matrices()
                + dc.check_curves() + dc.check_attack_tables() + dc.check_goals())
    assert problems == [], "\n".join(map(str, problems))


def test_a_robustness_matrix_that_drifted_from_its_records_is_named(tmp_path):
    """matrix.md is rebuilt from the runs' records: a committed copy whose cell was
    edited by hand, or whose records changed, is named; the real one passes."""
    import shutil

    from experiments.robustness_table import build_matrix

    results = tmp_path / "results"
    source = dc.RESULTS / "robustness-digits"
    for run in sorted((source / "runs").glob("fedavg-*__iid__s*"))[:6]:
        (results / "robustness-digits" / "runs" / run.name).mkdir(parents=True)
        shutil.copy(run / "summary.json", results / "robustness-digits" / "runs" / run.name)
    matrix = results / "robustness-digits" / "matrix.md"
    matrix.write_text(build_matrix("robustness-digits", results))
    assert dc.check_matrices(results) == []
    assert "| fedavg |" in matrix.read_text()  # one defence column: the records' only one
    _lower_final_accuracy(next((results / "robustness-digits" / "runs").glob("*/summary.json")), 0.1)
    problems = dc.check_matrices(results)
    assert [p.where for p in problems] == ["results/robustness-digits/matrix.md"]
    assert "robustness_table robustness-digits" in problems[0].what


def test_an_attack_table_that_drifted_from_its_records_is_named(tmp_path):
    """The audit's, membership's and inversion's table.md are rebuilt from their records:
    a record whose bound or score changed, or a table cell edited by hand, is named; the
    real ones pass."""
    import json
    import shutil

    results = tmp_path / "results"
    for folder in dc.ATTACK_TABLES:
        shutil.copytree(dc.RESULTS / folder, results / folder,
                        ignore=shutil.ignore_patterns("*.png"))
    assert dc.check_attack_tables(results) == []
    assert sorted(dc.ATTACK_TABLES) == ["audit", "inversion", "membership"]

    record = results / "audit" / "full-1step-eps8.json"
    audit = json.loads(record.read_text())
    audit["epsilon_lower_bound"] = 8.5  # above the accountant's 7.998: the verdict flips too
    record.write_text(json.dumps(audit))
    table = results / "membership" / "table.md"
    table.write_text(table.read_text().replace("| fed-dp-eps8 | 8.00 | 72.1 |",
                                               "| fed-dp-eps8 | 8.00 | 82.1 |", 1))
    record = results / "inversion" / "digits-cnn.json"
    inversion = json.loads(record.read_text())
    inversion["cases"]["secagg"]["psnr_mean"] = 12.0  # as if SecAgg+ had hidden the images
    record.write_text(json.dumps(inversion))
    problems = dc.check_attack_tables(results)
    assert [p.where for p in problems] == ["results/audit/table.md", "results/membership/table.md",
                                           "results/inversion/table.md"]
    assert "experiments.audit --table-only" in problems[0].what


def test_a_goal_whose_record_changed_is_named_and_its_verdict_follows_the_record(tmp_path):
    """goals.md and tables.md are rebuilt from the benchmark records: a SecAgg+
    measurement that moved past its limit changes both (the committed copies are named)
    and turns "met" into "mixed"; a record with no row for a goal is named too."""
    import json
    import shutil

    from experiments.goals import GOALS, build_goals

    bench = tmp_path / "benchmarks"
    shutil.copytree(dc.DOCS / "benchmarks", bench)
    for grid in ("redesign-check", "scaffold-lr-sweep", "fmnist-niid", "secagg-time-10",
                 "secagg-digits", "scaffold-variates", "momentum-path2"):  # tables.md reads them
        shutil.copytree(dc.RESULTS / grid, tmp_path / "results" / grid,
                        ignore=shutil.ignore_patterns("*.png", "*.log", "*.csv"))
    assert dc.check_goals(bench) == []
    secagg = bench / "secagg_overhead.jsonl"
    rows = [json.loads(line) for line in secagg.read_text().splitlines()]
    for row in rows:
        if row["when"].startswith("2026-12-02T02:21:52"):  # the CNN at 10 clients
            row["round_ratio"] = 1.2
    secagg.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.where for p in dc.check_goals(bench)] == ["benchmarks/goals.md", "benchmarks/tables.md"]
    cnn10 = next(line for line in build_goals(bench).splitlines() if "10 clients, the 46,826" in line)
    assert "1.021x (2026-12-01T22:22), 1.200x (2026-12-02T02:21) | mixed |" in cnn10
    secagg.write_text("")
    assert "cannot be built" in dc.check_goals(bench)[0].what
    assert "tables.md" in dc.check_goals(bench)[1].where
    assert len(GOALS) >= 7


def test_the_docs_include_generated_tables():
    """Not an empty check: the docs hold included tables from several grids."""
    included = [block for path in dc.doc_files() for block in dc._included(path, dc.DOCS)]
    assert len(included) >= 8
    assert len({source for _, _, source, _ in included}) >= 6


def test_the_unpaired_list_cannot_hide_a_grid_or_go_stale():
    """Without the list, the three grids of mixed code versions are named; a grid that
    pairs must not be on it."""
    problems = dc.check_grid_tables(unpaired={})
    assert sorted(p.where for p in problems) == sorted(
        f"results/{name}/table.md" for name in dc.UNPAIRED)
    assert all("refuses to pair" in p.what for p in problems)
    stale = dc.check_grid_tables(unpaired={**dc.UNPAIRED, "fedper-digits": "no reason"})
    assert [p.where for p in stale] == ["results/fedper-digits/table.md"]
    assert "remove it" in stale[0].what


def _doc(tmp_path, body: str):
    docs = tmp_path / "docs"
    (docs / "results" / "g").mkdir(parents=True)
    (docs / "results" / "g" / "table.md").write_text(
        "# g\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\ntext\n\n| c |\n|---|\n| 3 |\n")
    page = docs / "page.md"
    page.write_text(body)
    return docs, page


def test_a_copied_table_that_drifted_is_named_and_write_restores_it(tmp_path):
    docs, page = _doc(tmp_path, "intro\n\n<!-- generated: results/g/table.md, table 2 -->\n"
                                "| c |\n|---|\n| 4 |\n<!-- end generated -->\n\nafter\n")
    problems = dc.check_included([page], docs)
    assert len(problems) == 1 and "page.md:3" in str(problems[0])
    assert "table 2" in problems[0].what
    assert dc.check_included([page], docs, write=True) == []
    assert dc.check_included([page], docs) == []
    assert page.read_text() == ("intro\n\n<!-- generated: results/g/table.md, table 2 -->\n"
                                "| c |\n|---|\n| 3 |\n<!-- end generated -->\n\nafter\n")


def test_bad_markers_are_named(tmp_path):
    docs, page = _doc(tmp_path, "<!-- generated: results/g/table.md, table 3 -->\n| x |\n"
                                "<!-- end generated -->\n<!-- generated: results/h/table.md, "
                                "table 1 -->\n<!-- end generated -->\n")
    problems = [str(p) for p in dc.check_included([page], docs)]
    assert any("asks for table 3 of table.md, which has 2" in p for p in problems)
    assert any("does not exist" in p for p in problems)
    page.write_text("<!-- generated: results/g/table.md, table 1 -->\n| a | b |\n")
    (problem,) = dc.check_included([page], docs)
    assert "has no '<!-- end generated -->'" in problem.what


def test_markdown_tables_are_maximal_runs_of_pipe_lines():
    assert dc.markdown_tables("x\n| a |\n| b |\ny\n| c |") == [["| a |", "| b |"], ["| c |"]]


def test_an_unpaired_grids_table_is_still_checked(tmp_path, monkeypatch):
    """A grid on the UNPAIRED list gets no paired table, but its table.md (the rows, and
    the refusal in the paired table's place) must still be what its records give: a
    record changed after the table was written is named. The records: fmnist-niid's
    before its rerun (superseded-2026-12/: SCAFFOLD from newer code than FedAvg)."""
    import shutil

    monkeypatch.setitem(dc.UNPAIRED, "fmnist-niid", "the records before its rerun")
    results = tmp_path / "results"
    runs = results / "fmnist-niid" / "runs"
    for run in sorted((dc.RESULTS / "fmnist-niid" / "superseded-2026-12").glob("*__*")):
        (runs / run.name).mkdir(parents=True)
        shutil.copy(run / "summary.json", runs / run.name)
    text = dc.regenerate("fmnist-niid", results, unpaired_ok=True)
    assert "**No paired differences**" in text and "scaffold__iid__s0 vs fedavg__iid__s0" in text
    (results / "fmnist-niid" / "table.md").write_text(text)
    assert dc.check_grid_tables(results) == []
    _lower_final_accuracy(runs / "fedprox__path2__s1" / "summary.json", 0.01)
    problems = dc.check_grid_tables(results)
    assert [p.where for p in problems] == ["results/fmnist-niid/table.md"]
    assert "differs" in problems[0].what


def test_a_dp_invocations_table_is_its_rows_with_the_batch_32_baseline():
    """benchmark_tables' DP table: each mode against the plain epoch of its batch, and ew
    against the plain epoch at batch 32 of the same noise (1.90 / 1.16 = 1.64x), hand-made
    rows; rows outside the span are left out, and a span with no row is refused."""
    import pytest

    from experiments.benchmark_tables import dp_table

    rows = [{"when": "2026-12-04T02:05:59", "batch_size": 32, "randomness": "secure", "load_avg": 2.9,
             "plain_s": 1.16, "ew_s": 2.83, "ew_ratio": 2.44, "hooks_s": 2.98, "hooks_ratio": 2.57},
            {"when": "2026-12-04T02:06:16", "batch_size": 128, "randomness": "secure", "load_avg": 3.1,
             "plain_s": 0.90, "ew_s": 1.90, "ew_ratio": 2.11},
            {"when": "2026-12-05T00:00:00", "batch_size": 32, "plain_s": 9.0, "ew_s": 9.0, "ew_ratio": 1.0,
             "load_avg": 0.0}]
    table = dp_table(rows, "2026-12-04T02:05", "2026-12-04T02:07")
    assert "| 128 | secure | 0.90 s | – | 1.90 s, 2.11x | – | 1.64x |" in table
    assert "load average 2.90-3.10" in table and "9.00 s" not in table
    with pytest.raises(ValueError, match="no row from"):
        dp_table(rows, "2027-01-01", "2027-01-02")
